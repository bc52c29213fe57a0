import assert from 'node:assert/strict'
import type { Link } from '../../net/link/interfaces.ts'
import { createNetwork } from '../../net/membership/network.ts'
import { useLoopbackNodes, waitFor } from '../helpers/loopback-nodes.ts'

/** Sends `count` numbered messages on `chunks` as fast as backpressure allows. */
async function pump(link: Link, count: number, size: number): Promise<void> {
  const ch = link.channel('chunks')
  for (let i = 0; i < count; i++) {
    const m = new Uint8Array(size)
    new DataView(m.buffer).setUint32(0, i)
    m.fill(i & 0xff, 4)
    if (!ch.send(m)) await ch.onDrain()
  }
}

function collect(link: Link): number[] {
  const seen: number[] = []
  link.channel('chunks').onMessage((m) => {
    const i = new DataView(m.buffer, m.byteOffset).getUint32(0)
    // A corrupted or mis-delivered body shows up as a wrong fill byte.
    if (m[m.byteLength - 1] !== (i & 0xff)) seen.push(-1)
    else seen.push(i)
  })
  return seen
}

/**
 * The direct path (net/link/direct): a link's bulk channels move from the WebRTC link to a direct
 * libp2p connection while traffic flows, without losing or reordering a message.
 */
describe('mesh node: bulk channels move to a direct libp2p path (loopback)', function () {
  this.timeout(180_000)
  const { mk, logs } = useLoopbackNodes()

  it('moves chunks+migrate mid-transfer, in order and complete both ways; control stays on WebRTC', async () => {
    const key = await createNetwork('directnet')
    const boot = await mk('boot', { networkKey: key, bootstrapRole: { relay: true } })
    await boot.start()
    const b = await mk('b', { invite: await boot.invite({ ttlMs: 60_000 }) })
    await b.start()
    const c = await mk('c', { invite: await boot.invite({ ttlMs: 60_000 }) })
    await c.start()
    await waitFor('link b-c', () => b.overlay.link(c.peerId)?.state === 'open')
    await waitFor('link c-b', () => c.overlay.link(b.peerId)?.state === 'open')
    const bc = b.overlay.link(c.peerId)!
    const cb = c.overlay.link(b.peerId)!
    const atB = collect(bc)
    const atC = collect(cb)
    // Start at once: the upgrade happens while these run. (Kept small: three nodes share this process
    // and a long werift burst here can starve the links' heartbeats on a loaded machine.)
    const count = 800
    await Promise.all([pump(bc, count, 16 * 1024), pump(cb, count, 16 * 1024)])
    await waitFor('all messages', () => atB.length === count && atC.length === count)
    assert.deepEqual(atC, [...Array(count).keys()], 'b→c in order, complete, intact')
    assert.deepEqual(atB, [...Array(count).keys()], 'c→b in order, complete, intact')
    await waitFor('direct on both ends', () => bc.path.direct !== undefined && cb.path.direct !== undefined)
    assert.match(bc.path.direct ?? '', /^\/ip4\/127\.0\.0\.1\/tcp\/\d+/)
    assert.equal(b.members().find((m) => m.peerId === c.peerId)?.direct, bc.path.direct)
    // After the switch too: a second burst goes direct.
    const before = atC.length
    await pump(bc, 200, 64 * 1024)
    await waitFor('second burst', () => atC.length === before + 200)
    // control still works (it rides the WebRTC link)
    const got: string[] = []
    cb.channel('control').onMessage((m) => got.push(Buffer.from(m).toString()))
    bc.channel('control').send(Buffer.from('hello'))
    await waitFor('control message', () => got.includes('hello'))
    assert.equal(bc.state, 'open')
  })

  it('stays on WebRTC when one end has direct paths off, and data still flows', async () => {
    const key = await createNetwork('nodirect')
    const boot = await mk('boot2', { networkKey: key, bootstrapRole: { relay: true } })
    await boot.start()
    const d = await mk('d', { invite: await boot.invite({ ttlMs: 60_000 }), direct: false })
    await d.start()
    await waitFor('link boot-d', () => boot.overlay.link(d.peerId)?.state === 'open')
    await waitFor('link d-boot', () => d.overlay.link(boot.peerId)?.state === 'open')
    const l = boot.overlay.link(d.peerId)!
    const seen = collect(d.overlay.link(boot.peerId)!)
    await pump(l, 300, 16 * 1024)
    await waitFor('messages', () => seen.length === 300)
    assert.deepEqual(seen, [...Array(300).keys()])
    // Give a would-be upgrade time to happen, then check it did not.
    await new Promise((r) => setTimeout(r, 1500))
    assert.equal(l.path.direct, undefined)
    assert.equal(d.overlay.link(boot.peerId)?.path.direct, undefined)
    assert.ok(!logs.some((x) => x.startsWith('d: direct path to') && x.includes('now on')))
  })
})
