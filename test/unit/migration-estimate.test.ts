import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import {
  describeEstimate,
  type EstimateInput,
  estimate,
  MIN_MEASURE_MS,
  predictPostcopy,
  predictPrecopy,
  RateMeter,
} from '../../vm/migration/estimate.ts'

const MiB = 1024 * 1024
const MB = 1e6

interface Trace {
  workload: string
  samples: { atMs: number; intervalMs: number; dirtyBytes: number; hotBytes: number }[]
}
const trace = (name: string): Trace =>
  JSON.parse(readFileSync(join(import.meta.dirname, 'traces', `${name}.json`), 'utf8')) as Trace

/** The case as the source sees it ~2 s into the move: 412 MiB to send, 16 MB/s, 67 MB/s dirty. */
const hot: EstimateInput = {
  elapsedMs: 2000,
  unsentBytes: 412 * MiB,
  dirtyBytes: 0,
  dirtyBytesPerSec: 67 * MB,
  hotBytes: 384 * MiB,
  linkBytesPerSec: 16 * MB,
  linkMeasuredMs: 1500,
  dirtyMeasuredMs: 1000,
  rttMs: 4,
  scanMs: 120,
  postcopy: true,
}

describe('migration estimator', () => {
  describe('RateMeter', () => {
    it('measures a steady counter and smooths a change over its half-life', () => {
      const m = new RateMeter(1000)
      for (let t = 0; t <= 5000; t += 100) m.sample(t, t * 10_000) // 10 MB/s
      assert.ok(Math.abs(m.rate - 10 * MB) < 1, `steady: ${m.rate}`)
      for (let t = 5100; t <= 6000; t += 100) m.sample(t, 50_000_000 + (t - 5000) * 20_000) // 20 MB/s
      assert.ok(m.rate > 14 * MB && m.rate < 16 * MB, `one half-life after a step to 20 MB/s: ${m.rate}`)
      assert.equal(m.spanMs, 6000)
    })
    it('starts over when the counter goes back (a new session), ignores samples closer than 50 ms', () => {
      const m = new RateMeter()
      m.sample(0, 0)
      m.sample(1000, 5 * MB)
      m.sample(1010, 100 * MB)
      assert.equal(Math.round(m.rate), 5 * MB)
      m.sample(2000, 0)
      assert.equal(Math.round(m.rate), 5 * MB, 'a reset keeps the rate until the next interval')
    })
    it('adds intervals (dirty rounds)', () => {
      const m = new RateMeter()
      m.add(1000, 64 * MiB)
      assert.equal(m.rate, 64 * MiB)
      m.add(0, 1e9)
      assert.equal(m.rate, 64 * MiB, 'an empty interval changes nothing')
    })
  })

  describe('estimate() on the issue case', () => {
    it('a 10 s deadline: infeasible by any mode, with the numbers', () => {
      const e = estimate({ ...hot, deadlineMs: 10_000, maxPauseMs: 1000 })
      assert.equal(e.confident, true)
      assert.equal(e.feasible, false)
      assert.ok(e.minTotalMs > 28_000 && e.minTotalMs < 30_000, `minTotal ${e.minTotalMs}`)
      assert.ok(e.shortfallMs! > 18_000, `shortfall ${e.shortfallMs}`)
      assert.equal(e.precopyConverges, false, '67 MB/s of dirt over a 16 MB/s link never converges')
      assert.match(
        describeEstimate(e),
        /needs ≥ 29 s at 16\.0 MB\/s \(412 MiB to send\); the guest dirties 67\.0 MB\/s/,
      )
    })
    it('a 60 s deadline: feasible, by post-copy, paused well under a second', () => {
      const e = estimate({ ...hot, deadlineMs: 60_000, maxPauseMs: 1000 })
      assert.equal(e.feasible, true)
      assert.equal(e.mode, 'postcopy')
      assert.ok(e.pauseMs < 500, `pause ${e.pauseMs}`)
      assert.ok(e.totalMs < 60_000, `total ${e.totalMs}`)
      // The bulk copy (412 MiB) and the owed hot set (384 MiB at most) each cross once.
      assert.ok(e.totalMs > e.minTotalMs)
    })
    it('without post-copy the same move is refused even at 60 s (pre-copy never converges)', () => {
      const e = estimate({ ...hot, postcopy: false, deadlineMs: 60_000, maxPauseMs: 1000 })
      assert.equal(e.mode, 'precopy')
      assert.equal(e.feasible, false)
      assert.equal(e.totalMs, Number.POSITIVE_INFINITY)
    })
    it('no verdict before the link has been measured for a while', () => {
      const e = estimate({ ...hot, linkMeasuredMs: MIN_MEASURE_MS - 1, deadlineMs: 10_000 })
      assert.equal(e.confident, false)
      assert.equal(e.feasible, undefined)
    })
  })

  describe('predictions', () => {
    const calm: EstimateInput = {
      ...hot,
      unsentBytes: 100 * MiB,
      dirtyBytesPerSec: 2 * MB,
      hotBytes: 8 * MiB,
      maxPauseMs: 1000,
    }
    it('a calm guest: pre-copy converges to a short pause', () => {
      const p = predictPrecopy(calm)
      assert.ok(p !== undefined)
      assert.ok(p.pauseMs < 1000, `pause ${p.pauseMs}`)
      const e = estimate(calm)
      assert.equal(e.mode, 'precopy')
      assert.equal(e.precopyConverges, true)
    })
    it('a guest rewriting a small working set fast still converges (the set bounds the rest)', () => {
      const e = estimate({ ...calm, dirtyBytesPerSec: 80 * MB, hotBytes: 4 * MiB })
      assert.equal(e.mode, 'precopy')
      assert.ok(e.pauseMs < 1000, `pause ${e.pauseMs}`)
    })
    it('no bound on the pause: stop-and-copy of what is left when rounds stop shrinking', () => {
      const p = predictPrecopy({ ...hot, maxPauseMs: undefined })
      assert.ok(p !== undefined)
      assert.ok(p.pauseMs > 20_000, `a 384 MiB stop-and-copy: ${p.pauseMs}`)
    })
    it('post-copy: the owed set is bounded by the working set', () => {
      const p = predictPostcopy({ ...hot, hotBytes: 10 * MiB })!
      const q = predictPostcopy(hot)!
      assert.ok(q.totalMs - p.totalMs > 20_000)
      assert.equal(p.pauseMs, q.pauseMs)
    })
    it('nothing measured: no prediction', () => {
      assert.equal(predictPrecopy({ ...hot, linkBytesPerSec: 0 }), undefined)
      assert.equal(estimate({ ...hot, linkBytesPerSec: 0 }).minTotalMs, Number.POSITIVE_INFINITY)
    })
  })

  describe('replaying recorded dirty-rate traces (real guest, compare tracker)', () => {
    /** Feeds a trace to the estimator as the source would, over a link of `link` bytes/s. */
    function replay(t: Trace, link: number, input: Partial<EstimateInput>) {
      const dirty = new RateMeter(2000)
      const out: ReturnType<typeof estimate>[] = []
      let sent = 0
      for (const s of t.samples) {
        dirty.add(s.intervalMs, s.dirtyBytes)
        sent = Math.min(sent + (link * s.intervalMs) / 1000, 420 * MiB)
        out.push(
          estimate({
            ...hot,
            ...input,
            elapsedMs: s.atMs,
            unsentBytes: 420 * MiB - sent,
            dirtyBytes: Math.min(s.hotBytes, sent),
            dirtyBytesPerSec: dirty.rate,
            hotBytes: s.hotBytes,
            linkBytesPerSec: link,
            linkMeasuredMs: s.atMs,
            dirtyMeasuredMs: dirty.spanMs,
          }),
        )
      }
      return out
    }

    it('hot (64 MiB/s over 384 MiB): refused at 10 s from the first sample on; 60 s goes by post-copy', () => {
      const t = trace('hot')
      const rate =
        t.samples.reduce((s, x) => s + x.dirtyBytes, 0) / t.samples.reduce((s, x) => s + x.intervalMs, 0)
      assert.ok(rate * 1000 > 50 * MiB, `the trace holds a hot guest: ${(rate * 1000) / MiB} MiB/s`)
      const ten = replay(t, 16 * MB, { deadlineMs: 10_000, maxPauseMs: 1000 })
      assert.equal(ten[0]!.feasible, false, 'verdict after the first second')
      assert.ok(ten.every((e) => e.feasible === false))
      const sixty = replay(t, 16 * MB, { deadlineMs: 60_000, maxPauseMs: 1000 })
      assert.ok(sixty.slice(0, 3).every((e) => e.feasible === true && e.mode === 'postcopy'))
      assert.ok(sixty.every((e) => e.pauseMs < 1000))
    })
    it('idle: pre-copy, a pause far under a second', () => {
      const e = replay(trace('idle'), 16 * MB, { deadlineMs: 60_000, maxPauseMs: 1000 })
      assert.ok(
        e.every((x) => x.mode === 'precopy' && x.precopyConverges),
        JSON.stringify(e.at(-1)),
      )
      assert.ok(e.at(-1)!.pauseMs < 1000)
    })
    it('moderate (8 MiB/s over 16 MiB): pre-copy converges', () => {
      const e = replay(trace('moderate'), 16 * MB, { deadlineMs: 60_000, maxPauseMs: 1000 })
      assert.ok(
        e.slice(1).every((x) => x.mode === 'precopy'),
        JSON.stringify(e.map((x) => x.mode)),
      )
    })
  })
})
