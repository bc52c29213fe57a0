/**
 * werift's SCTP congestion control as patched by mesh (patches/werift+0.24.4.patch), over an emulated
 * path in this process (test/helpers/sctp-pair.ts): a real RTT, seeded loss, a bottleneck that
 * tail-drops. Issue 13: one SACK per event-loop turn had kept the flight at ~5 KB per RTT (0.15 MB/s at
 * 31 ms); the first test is the one that would have caught it.
 */
import assert from 'node:assert/strict'
import { pushFor, sctpPair } from '../helpers/sctp-pair.ts'

const KiB = 1024
const log = (s: string) => process.stdout.write(`      ${s}\n`)
/** An event-loop stall past this (> 3× the 15 ms one-way delay) bends the emulated path's timing. */
const STALL_MS = 50
/** A try whose main thread waited this share of its time for a CPU was starved by the box. */
const STARVED_SHARE = 0.25

describe('werift SCTP congestion control (emulated path)', function () {
  this.timeout(60_000)

  for (const cc of ['tolerant', 'reno'] as const) {
    // Counted in data, not wall time: slow start with byte counting doubles the window each round trip,
    // so from the initial window (~4 packets) it passes 512 KiB after about 1 MiB has been delivered. The
    // regression (one SACK per turn, ~5 KB more per round trip) needs ~100 round trips and tens of MB.
    // But the window only grows while the sender fills it (RFC 9260 7.2.1), and filling 512 KiB every
    // 30 ms takes ~17 MB/s of this process's CPU: when other work starves it, the sender is app-limited
    // and the window rightly waits. So a try that the machine starved is repeated (fresh associations,
    // up to 3 tries); the regression fails every try.
    it(`${cc}: cwnd grows past 512 KB over a 30 ms path in slow start (within 4 MiB delivered), one SACK per turn`, async () => {
      let last = ''
      for (let attempt = 1; attempt <= 3; attempt++) {
        const p = await sctpPair({ oneWayMs: 15 }, { congestionControl: cc })
        try {
          let delivered = 0
          p.server.onReceive.subscribe((_s, _p, data) => {
            delivered += data.byteLength
          })
          let reachedAt: number | undefined
          let deliveredAtReach: number | undefined
          const t0 = performance.now()
          const reached = () => {
            if (reachedAt === undefined && p.client.cwnd > 512 * KiB) {
              reachedAt = performance.now() - t0
              deliveredAtReach = delivered
            }
            return reachedAt !== undefined
          }
          const watch = setInterval(reached, 5)
          // Until 4 MiB went through without the window passing 512 KiB, or 500 ms after it did (for
          // the SACK ratio); at most 20 s.
          const r = await pushFor(p.client, p.server, 20_000, {
            sampleMs: 100,
            until: () => (reached() ? performance.now() - t0 > reachedAt! + 500 : delivered > 4 * 1024 * KiB),
          })
          clearInterval(watch)
          const max = Math.max(p.client.cwnd, ...r.cwnd.map((s) => s.cwnd))
          log(
            `${cc} (try ${attempt}): cwnd ${Math.round(max / KiB)} KiB (past 512 KiB after ${reachedAt?.toFixed(0)} ms, ${((deliveredAtReach ?? delivered) / KiB).toFixed(0)} KiB delivered), ${r.mbps.toFixed(1)} MB/s, ${p.forward.packets} DATA packets / ${p.backward.packets} SACK packets`,
          )
          assert.equal(r.corrupt, 0)
          assert.equal(r.received, r.sent)
          // The per-turn SACK saving is kept: far fewer SACK packets than DATA packets.
          assert.ok(p.backward.packets * 5 < p.forward.packets, 'one SACK per turn, not per packet')
          if (deliveredAtReach !== undefined && deliveredAtReach <= 4 * 1024 * KiB) return
          last = `cwnd stayed at ${Math.round(max / KiB)} KiB after ${Math.round(delivered / KiB)} KiB delivered (${r.mbps.toFixed(1)} MB/s)`
        } finally {
          await p.close()
        }
      }
      assert.fail(`${last}: not slow start, in 3 tries`)
    })
  }

  it('tolerant: random loss (0.2% at 120 ms, 4 MB/s) is repaired without shrinking the window; reno halves', async () => {
    // The bottleneck, not the CPU, bounds this path (4 MB/s: a fraction of what the emulation can do), so
    // the outcome is the congestion control's. Reno's bound here: 1200 B / 120 ms × 1.22/√0.002 ≈ 0.27 MB/s.
    // A stalled event loop (a loaded CI box) runs the emulated path's timers late: a stall past a few
    // RTOs' worth expires T3 and collapses any window, which says nothing about the congestion control.
    // So tolerant's try is repeated (up to 3) while it stalled AND missed its own bounds; reno's is not
    // (a stall only shrinks reno's window further, which cannot make the comparison below pass wrongly).
    const results: Record<string, { mbps: number; minCwnd: number }> = {}
    for (const cc of ['tolerant', 'reno'] as const) {
      for (let attempt = 1; ; attempt++) {
        const p = await sctpPair(
          { oneWayMs: 60, loss: 0.002, rateBps: 4e6, seed: 7 },
          { congestionControl: cc },
        )
        try {
          const r = await pushFor(p.client, p.server, 6000, { sampleMs: 100, drainMs: 10_000 })
          assert.equal(r.corrupt, 0, 'every message intact and in order')
          assert.equal(r.received, r.sent)
          // After slow start (2 s): the steady state.
          const late = r.cwnd.filter((s) => s.t > 2000 && s.t < 6000)
          const lateMbps =
            (late.at(-1)!.bytes - late[0]!.bytes) / 1e6 / ((late.at(-1)!.t - late[0]!.t) / 1000)
          results[cc] = { mbps: lateMbps, minCwnd: Math.min(...late.map((s) => s.cwnd)) }
          log(
            `${cc} (try ${attempt}): ${lateMbps.toFixed(2)} MB/s in steady state, cwnd ≥ ${Math.round(results[cc].minCwnd / KiB)} KiB, ${p.forward.dropped} DATA packets dropped, event loop stalled up to ${r.maxStallMs} ms`,
          )
          assert.ok(p.forward.dropped > 0, 'loss was injected')
          const stalled = r.maxStallMs > 2 * STALL_MS
          const fine = results[cc]!.minCwnd > 256 * KiB && lateMbps > 4 * 0.6
          if (cc === 'reno' || !stalled || fine || attempt === 3) break
        } finally {
          await p.close()
        }
      }
    }
    // Window outcomes, not only rates: a loaded machine (timers late, RTT samples inflated) slows both,
    // but reno's window still collapses to a few packets after each loss and tolerant's does not.
    assert.ok(results.tolerant!.minCwnd > 256 * KiB, 'tolerant keeps its window through random loss')
    assert.ok(results.tolerant!.minCwnd > 4 * results.reno!.minCwnd, 'reno halves, tolerant does not')
    assert.ok(
      results.tolerant!.mbps > 2.5 * results.reno!.mbps,
      'tolerant moves well over twice what reno moves',
    )
  })

  // 'Uses the bottleneck' needs 4 MB/s of this process's CPU: a try the machine starved (the sender
  // app-limited, far below the rate) is repeated, up to 5 tries. The drop and flight bounds are judged
  // on every try the event loop ran on time; a try with a stall far past the path's 15 ms one-way delay
  // is not judged on them (the emulated bottleneck runs on this process's timers: after a stall it
  // delivers a burst of SACKs at once and the sender answers with a burst no real path would see; a
  // nice'd run at load 15 tail-dropped 5.17% so). A sender that does not back off fails every try that
  // ran on time.
  it('tolerant: backs off on a congested bottleneck (4 MB/s, 200-packet queue): few drops, bounded flight', async () => {
    let last = ''
    let starvedEvery = true
    for (let attempt = 1; attempt <= 5; attempt++) {
      const p = await sctpPair(
        { oneWayMs: 15, rateBps: 4e6, queuePackets: 200 },
        { congestionControl: 'tolerant' },
      )
      try {
        const r = await pushFor(p.client, p.server, 5000, { sampleMs: 100 })
        const late = r.cwnd.filter((s) => s.t > 2000)
        const maxFlight = Math.max(...late.map((s) => s.flight))
        const dropRate = p.forward.queueDropped / p.forward.packets
        const said = `try ${attempt}: ${r.mbps.toFixed(2)} MB/s of 4, ${(dropRate * 100).toFixed(2)}% tail-dropped, flight ≤ ${Math.round(maxFlight / KiB)} KiB (BDP 117 KiB + queue 234 KiB), event loop stalled up to ${r.maxStallMs} ms, waited for a CPU ${Math.round(r.waitShare * 100)}% of the time`
        log(said)
        assert.equal(r.corrupt, 0)
        const bounded = dropRate < 0.05 && maxFlight < 600 * KiB
        if (r.maxStallMs <= STALL_MS || bounded) {
          assert.ok(dropRate < 0.05, `does not keep overflowing the queue: ${said}`)
          assert.ok(maxFlight < 600 * KiB, `flight bounded by BDP + queue: ${said}`)
          if (r.mbps > 4 * 0.7) return
        }
        if (r.waitShare < STARVED_SHARE) starvedEvery = false
        last = said
      } finally {
        await p.close()
      }
    }
    // Every try kept the drop and flight bounds, but in each the box left this process waiting for a CPU
    // (runnable, not running: schedstat) so long that 4 MB/s was out of its reach — a nice'd run at load
    // 30 made 1.5–2.4 MB/s in 5 tries. The rate is then not judged, and said so. A sender slowed by its
    // own work is running, not waiting: it fails here.
    if (starvedEvery) {
      log(`rate not judged: the box starved every try (${last})`)
      return
    }
    assert.fail(`no try both used the bottleneck and ran without a stall in 5 tries: ${last}`)
  })

  it('tolerant: under 2% loss every message still arrives intact and in order', async () => {
    const p = await sctpPair({ oneWayMs: 5, loss: 0.02, seed: 11 }, { congestionControl: 'tolerant' })
    try {
      const r = await pushFor(p.client, p.server, 2000, { messageBytes: 20_000, sampleMs: 100 })
      log(`${r.received} messages, ${p.forward.dropped} DATA + ${p.backward.dropped} SACK packets dropped`)
      assert.ok(p.forward.dropped > 10)
      assert.equal(r.corrupt, 0)
      assert.equal(r.received, r.sent)
    } finally {
      await p.close()
    }
  })
})
