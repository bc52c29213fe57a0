import assert from 'node:assert/strict'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { ECHO_PORT } from '../../fixtures/guest/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { createLogger } from '../../src/base/log.ts'
import { createMigRig, type MigRig } from '../helpers/tunnel-migration-rig.ts'

/**
 * Survival: a client (member T, through its host TAP port) streams through one TCP connection to the
 * guest's echo service while the VM live-migrates A→B→C→A (RAM as chunks, device state, the NIC
 * re-plugged into the tunnel at each destination): no reset, every byte echoed exactly, longest gap
 * measured.
 */
describe('tunnel survival across live migrations (three hosts + a client member, one process)', function () {
  this.timeout(900_000)
  let rig: MigRig | undefined

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['qemu-system-x86_64', 'socat', 'busybox', 'ip'] })
    rig = await createMigRig(['A', 'B', 'C'], { subnet: '10.254.0', log: createLogger({ level: 'error' }) })
  })
  after(async () => {
    await rig?.destroy()
  })

  it('a TCP stream to the guest survives A→B→C→A: zero resets, every byte echoed', async () => {
    const r = rig!
    const spec = r.spec('tunsurv', '10.254.0.20/24')
    await r.boot('A', spec)
    const ping = await r.ping('10.254.0.20')
    assert.match(ping, /3 packets received/)
    // The switches share this event loop with migration: a long block there is a stall in the tunnel.
    const lag = monitorEventLoopDelay({ resolution: 10 })
    lag.enable()
    const stream = r.streamEcho('10.254.0.20', ECHO_PORT)
    await new Promise((res) => setTimeout(res, 2000))
    const moves: Array<{ from: string; to: string; totalMs: number; downtimeMs: unknown }> = []
    for (const [from, to] of [
      ['A', 'B'],
      ['B', 'C'],
      ['C', 'A'],
    ] as const) {
      const rep = await r.hosts
        .get(from)!
        .migration.migrate({ vm: spec.name, to })
        .catch(async (err: Error) => {
          // Say where the guest is (and what its console said last) when a move cannot start: this
          // suite has failed once with no host holding the VM.
          const where = await Promise.all(
            [...r.hosts.values()].map(async (h) => {
              const vm = h.host.get(spec.name)
              const tail = vm === undefined ? [] : await vm.consoleTail(5).catch(() => [])
              return `${h.id}: ${vm?.status() ?? 'none'} ${tail.join(' | ')}`
            }),
          )
          err.message += ` [move ${from}→${to}; ${where.join('; ')}]`
          throw err
        })
      const rec = rep as unknown as Record<string, unknown>
      moves.push({ from, to, totalMs: Number(rec.totalMs), downtimeMs: rec.downtimeMs })
      assert.equal(r.hosts.get(to)!.host.get(spec.name)?.status(), 'running')
      await new Promise((res) => setTimeout(res, 1500))
    }
    const res = await stream.stop()
    lag.disable()
    const eventLoopMaxMs = Math.round(lag.max / 1e6)
    process.stdout.write(`      survival: ${JSON.stringify({ moves, eventLoopMaxMs, ...res })}\n`)
    assert.equal(res.connected, true)
    assert.equal(res.resets, 0, JSON.stringify(res))
    assert.equal(res.mismatches, 0)
    assert.equal(res.bytesEchoed, res.bytesSent)
    assert.ok(res.bytesSent > 100_000)
    assert.equal(r.hosts.get('B')!.tunnel.switch.lookup(spec.mac), 'peer:A')
  })
})
