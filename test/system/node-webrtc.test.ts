import assert from 'node:assert/strict'
import { createNetwork } from '../../net/membership/network.ts'
import { useLoopbackNodes, waitFor } from '../helpers/loopback-nodes.ts'

/** The real wiring: werift links signaled over libp2p streams, between three nodes on loopback. */
describe('mesh node: werift links over libp2p signaling (loopback)', function () {
  this.timeout(180_000)
  const { mk } = useLoopbackNodes()

  it('bootstrap + 2 members get WebRTC links and data flows both ways', async () => {
    const key = await createNetwork('rtcnet')
    const boot = await mk('boot', { networkKey: key, bootstrapRole: { relay: true } })
    await boot.start()
    const b = await mk('b', { invite: await boot.invite({ ttlMs: 60_000 }) })
    await b.start()
    const c = await mk('c', { invite: await boot.invite({ ttlMs: 60_000 }) })
    await c.start()
    const all = [boot, b, c]
    for (const x of all)
      for (const y of all)
        if (x !== y)
          await waitFor(`link ${x.peerId}->${y.peerId}`, () => x.overlay.link(y.peerId)?.state === 'open')
    const bc = b.overlay.link(c.peerId)!
    const cb = c.overlay.link(b.peerId)!
    // On loopback ICE picks the host pair, or a peer-reflexive one when a check arrives first.
    assert.ok(['host', 'prflx'].includes(bc.path.type), `path ${bc.path.type}`)
    const got: string[] = []
    cb.channel('control').onMessage((m) => got.push(`b->c ${Buffer.from(m)}`))
    bc.channel('control').onMessage((m) => got.push(`c->b ${Buffer.from(m)}`))
    bc.channel('control').send(Buffer.from('ping'))
    cb.channel('control').send(Buffer.from('pong'))
    await waitFor('messages', () => got.length === 2)
    assert.deepEqual(got.sort(), ['b->c ping', 'c->b pong'])
    const st = b.members().find((m) => m.peerId === c.peerId)!
    assert.equal(st.link, 'open')
    assert.equal(st.path, bc.path.type)
  })
})
