import assert from 'node:assert/strict'
import { ECHO_PORT } from '../../fixtures/guest/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { createRig, type Rig } from '../helpers/tunnel-rig.ts'

/**
 * Real guests under QEMU (TCG) on two switches joined by an in-memory link; the host side is a TAP
 * port on switch a, moved into a private namespace. Guest g1 is local to a, g2 is behind the link.
 */
describe('tunnel with QEMU guests (three switches, memory links)', function () {
  this.timeout(300_000)
  let rig: Rig | undefined

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['qemu-system-x86_64', 'socat', 'busybox', 'ip'] })
    rig = await createRig({
      nodes: ['a', 'b', 'c'],
      subnet: '10.250.0',
      guests: [
        { name: 'g1', on: 'a', ip: '10.250.0.11', mac: '52:54:00:fa:00:11' },
        { name: 'g2', on: 'b', ip: '10.250.0.12', mac: '52:54:00:fa:00:12' },
      ],
    })
  })
  after(async () => {
    await rig?.destroy()
  })

  it('the host TAP pings the local guest and the guest behind the link', async () => {
    const r = rig!
    const local = await r.ping('10.250.0.11')
    assert.equal(local.received, 3, local.out)
    const remote = await r.ping('10.250.0.12')
    assert.equal(remote.received, 3, remote.out)
    // The guests' MACs are where they were attached; the TAP's MAC was learned at a, by b over the link.
    assert.equal(r.service('a').switch.lookup('52:54:00:fa:00:12'), 'peer:b')
    assert.equal(r.service('b').switch.lookup('52:54:00:fa:00:11'), 'peer:a')
    const st = r.service('b').switch.status()
    const vm = st.ports.find((p) => p.kind === 'vm')!
    assert.equal(vm.connected, true)
    assert.ok(vm.txFrames >= 3 && vm.rxFrames >= 3, JSON.stringify(vm))
  })

  it('carries a TCP stream to the echo service of the guest behind the link, every byte exact', async () => {
    const res = await rig!.streamEcho('10.250.0.12', ECHO_PORT, 3000)
    assert.equal(res.connected, true, JSON.stringify(res))
    assert.equal(res.resets, 0, JSON.stringify(res))
    assert.equal(res.mismatches, 0)
    assert.ok(res.bytesSent > 100_000, `sent ${res.bytesSent}`)
    assert.equal(res.bytesEchoed, res.bytesSent)
  })

  it('survival: a TCP stream to the guest keeps going while its NIC moves b→c→a→b (no reset, every byte)', async () => {
    const r = rig!
    const moves: Array<{ to: string; ms: number }> = []
    const run = r.startStreamEcho('10.250.0.12', ECHO_PORT, 9000)
    for (const to of ['c', 'a', 'b']) {
      await new Promise((res) => setTimeout(res, 2000))
      const t0 = performance.now()
      await r.moveNic('g2', to)
      moves.push({ to, ms: Math.round(performance.now() - t0) })
    }
    const res = await run
    process.stdout.write(`      survival: ${JSON.stringify({ moves, ...res, errors: undefined })}\n`)
    assert.equal(res.connected, true)
    assert.equal(res.resets, 0, JSON.stringify(res))
    assert.equal(res.mismatches, 0)
    assert.equal(res.bytesEchoed, res.bytesSent)
    assert.ok(res.bytesSent > 500_000)
    assert.equal(r.where('g2'), 'b')
    // Every switch now sends g2's frames to b.
    assert.equal(r.service('a').switch.lookup('52:54:00:fa:00:12'), 'peer:b')
    assert.equal(r.service('c').switch.lookup('52:54:00:fa:00:12'), 'peer:b')
  })
})
