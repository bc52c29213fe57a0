/**
 * Survival end to end: real `mesh` agents as processes in four NAT'd clouds. A client in cloud d (its
 * member's host TAP port) streams through one TCP connection to the guest's echo service while the VM
 * live-migrates a1→b1→c1→a1 (three hosting clouds) through `mesh migrate`. Zero resets, every byte
 * echoed exactly and in order, and the longest gap is printed and bounded.
 *
 * The bound: the target is 300 ms (what `npm run bench -- tunnel` reports); on a loaded 2-core CI box
 * the migration's downtime alone reached 1.6 s with other suites running, so the test asserts a looser
 * bound (MESH_SURVIVAL_MAX_GAP_MS, default 2500 ms) that still fails when frames are lost for good and
 * the client's TCP backs off through several retransmission timeouts (200, 400, 800, 1600 ms...).
 */
import assert from 'node:assert/strict'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { createSurvivalNet, type SurvivalNet, surviveMoves } from '../helpers/tunnel-survival.ts'

const MAX_GAP_MS = Number(process.env.MESH_SURVIVAL_MAX_GAP_MS ?? 2500)

describe("tunnel survival across NAT'd clouds (e2e: agents as processes, a→b→c→a, client in d)", function () {
  this.timeout(600_000)
  let s: SurvivalNet | undefined

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft', 'qemu-system-x86_64', 'socat', 'busybox'] })
    s = await createSurvivalNet()
  })

  after(async () => {
    await s?.destroy()
  })

  it('a TCP stream from a fourth cloud survives three moves: no reset, every byte echoed in order', async () => {
    const { moves, stream, drops, pingAfter } = await surviveMoves(s!)
    process.stdout.write(
      `      moves: ${moves.map((m) => `${m.from}→${m.to} ${m.totalMs} ms (downtime ${m.downtimeMs} ms, gap ${m.gapMs} ms)`).join(', ')}\n` +
        `      stream: ${stream.bytesEchoed} B echoed of ${stream.bytesSent}, resets ${stream.resets}, ` +
        `longest gap ${stream.maxGapMs} ms; ${stream.gaps.length} gaps > 100 ms, > 300 ms: ${stream.gaps
          .filter((g) => g.ms > 300)
          .map((g) => g.ms)
          .join(
            ', ',
          )}\n      switch drops: ${JSON.stringify(drops)}; guest answers ping after: ${pingAfter}\n`,
    )
    assert.equal(moves.length, 3)
    assert.equal(stream.connected, true)
    assert.equal(stream.resets, 0, `resets: ${stream.errors.join(', ')}`)
    assert.equal(stream.mismatches, 0, 'every echoed byte must equal what was sent at that offset')
    assert.equal(stream.bytesEchoed, stream.bytesSent, 'every byte sent must come back')
    assert.ok(stream.bytesSent > 100_000, `only ${stream.bytesSent} bytes streamed`)
    assert.ok(stream.maxGapMs <= MAX_GAP_MS, `longest gap ${stream.maxGapMs} ms > ${MAX_GAP_MS} ms`)
    // The guest ends where it started, running, and nowhere else.
    const where = await Promise.all(
      ['a1', 'b1', 'c1'].map(async (n) => {
        const ls = await s!.net.agents.get(n)!.json<{ vms: { name: string; status: string }[] }>(['vm', 'ls'])
        return ls.vms.map((v) => `${n}:${v.name}:${v.status}`)
      }),
    )
    assert.deepEqual(where.flat(), [`a1:${s!.vm}:running`])
  })
})
