/**
 * Know before you promise: what a move will cost, from what the source measures while it runs (the
 * link's send rate, the guest's dirty rate, how much RAM is left to send), as a pure function so that
 * the policy is tested on recorded traces (test/unit/migration-estimate.test.ts).
 *
 * The model. Every byte of RAM the destination lacks must cross the link at least once, so no mode can
 * finish before `now + outstanding / link` (plus the switch itself): that lower bound is what a deadline
 * is judged against (a move is refused only when even that misses). Pre-copy also re-sends what the
 * guest dirties meanwhile: it converges only while the dirty rate stays below the link rate, and its
 * pause is the last dirty set over the link. Post-copy sends each outstanding byte once more or less
 * (the guest runs on the destination and pulls what it touches), so its total is close to the bound and
 * its pause is the fixed cost of the switch alone.
 */

/** An exponentially weighted rate over a cumulative counter (bytes sent, bytes dirtied). */
export class RateMeter {
  private lastMs: number | undefined
  private lastTotal = 0
  private value = 0
  /** Time covered by samples so far (how far the rate can be trusted). */
  spanMs = 0

  constructor(private readonly halfLifeMs = 2000) {}

  /** Adds a sample of the counter at `atMs`; returns the rate in units per second. */
  sample(atMs: number, total: number): number {
    if (this.lastMs === undefined || total < this.lastTotal) {
      this.lastMs = atMs
      this.lastTotal = total
      return this.value
    }
    const dt = atMs - this.lastMs
    if (dt < 50) return this.value
    this.add(dt, total - this.lastTotal)
    this.lastMs = atMs
    this.lastTotal = total
    return this.value
  }

  /** Adds `amount` over `intervalMs` (a dirty round: bytes found dirty over its interval). */
  add(intervalMs: number, amount: number): number {
    if (!(intervalMs > 0)) return this.value
    const inst = (amount * 1000) / intervalMs
    const w = 1 - 0.5 ** (intervalMs / this.halfLifeMs)
    this.value = this.spanMs === 0 ? inst : this.value + w * (inst - this.value)
    this.spanMs += intervalMs
    return this.value
  }

  get rate(): number {
    return this.value
  }
}

/**
 * The rate of a cumulative counter over the last `windowMs` (the migrate channel's send rate: bytes put
 * on the channel, which backpressure paces at the link's speed once its buffer is full).
 */
export class WindowRate {
  private readonly samples: { t: number; v: number }[] = []

  constructor(private readonly windowMs = 3000) {}

  sample(t: number, v: number): void {
    const last = this.samples.at(-1)
    if (last !== undefined && (v < last.v || t <= last.t)) {
      if (v < last.v) this.samples.length = 0
      else return
    }
    this.samples.push({ t, v })
    // Keep one sample at or before the window's start.
    while (this.samples.length > 2 && this.samples[1]!.t <= t - this.windowMs) this.samples.shift()
  }

  get spanMs(): number {
    return this.samples.length < 2 ? 0 : this.samples.at(-1)!.t - this.samples[0]!.t
  }

  get rate(): number {
    if (this.samples.length < 2) return 0
    const a = this.samples[0]!
    const b = this.samples.at(-1)!
    return b.t > a.t ? ((b.v - a.v) * 1000) / (b.t - a.t) : 0
  }
}

/** How a move can end (the report's `mode`). */
export type MoveMode = 'precopy' | 'postcopy'

export interface EstimateInput {
  /** ms since the move started. */
  elapsedMs: number
  /** Non-zero RAM the destination lacks that has not been sent yet (the rest of the bulk copy). */
  unsentBytes: number
  /** Bytes sent already but dirtied since (what the next round, or the final delta, must carry). */
  dirtyBytes: number
  /** The guest's dirty rate, bytes/s. */
  dirtyBytesPerSec: number
  /**
   * Distinct RAM the guest wrote since the move began (its working set as far as seen): the dirty set
   * never grows beyond it, so a guest that rewrites the same 8 MiB converges whatever its rate.
   * 0 = unknown (then the dirty set is bounded only by the rate).
   */
  hotBytes: number
  /** The migrate channel's send rate, bytes/s (0 = not measured yet). */
  linkBytesPerSec: number
  /** How long the link rate has been measured, ms. */
  linkMeasuredMs: number
  /** How long the dirty rate has been measured, ms. */
  dirtyMeasuredMs: number
  rttMs: number
  /** What finding the dirty set costs with the guest paused (the final scan), ms. */
  scanMs: number
  /** Post-copy can be used for this move (the destination has the pager; not turned off). */
  postcopy: boolean
  /** The whole move must end within this (from its start). */
  deadlineMs?: number
  /** The guest must never be paused longer than this. */
  maxPauseMs?: number
}

export interface Estimate {
  linkBytesPerSec: number
  dirtyBytesPerSec: number
  /** What is still to cross the link at least once: unsent + dirty. */
  outstandingBytes: number
  /** The least total time (from the start) any mode can take. */
  minTotalMs: number
  /** The mode this estimate would pick, and what it predicts. */
  mode: MoveMode
  totalMs: number
  pauseMs: number
  /** Pre-copy alone would reach a pause within maxPauseMs (or, without one, settle at all). */
  precopyConverges: boolean
  /** Against the deadline: undefined while the rates are not measured well enough to say. */
  feasible?: boolean
  /** How much the best case misses the deadline by, ms (when it does). */
  shortfallMs?: number
  /** Enough measurement to judge (link measured ≥ MIN_MEASURE_MS, dirty rate seen at least once). */
  confident: boolean
}

/** The switch's fixed cost beyond the final scan and the transfer: device state save/load, resume. */
export const SWITCH_FIXED_MS = 250
/** How long the link rate must have been measured before a verdict. */
export const MIN_MEASURE_MS = 600
/** A pre-copy is predicted to converge only while the guest dirties less than this share of the link. */
export const CONVERGE_SHARE = 0.8
/** Rounds simulated at most when predicting pre-copy. */
const MAX_SIM_ROUNDS = 30

/** The pause a switch costs beyond sending `bytes` with the guest stopped. */
export function switchCostMs(i: Pick<EstimateInput, 'rttMs' | 'scanMs'>): number {
  // The final scan, the device state (save, send, load), 'ready' and the commit: two round trips.
  return SWITCH_FIXED_MS + i.scanMs + 2 * i.rttMs
}

/**
 * Pre-copy from here: rounds of what the guest dirtied while the previous one was sent, until the rest
 * can go in a pause of at most maxPauseMs (or until it stops shrinking). Returns the time until the
 * guest runs on the destination and the pause, or undefined when it does not converge.
 */
export function predictPrecopy(i: EstimateInput): { totalMs: number; pauseMs: number } | undefined {
  const link = i.linkBytesPerSec
  if (!(link > 0)) return undefined
  const d = i.dirtyBytesPerSec
  const hot = i.hotBytes > 0 ? i.hotBytes : Number.POSITIVE_INFINITY
  const cost = switchCostMs(i)
  const pauseFor = (bytes: number) => cost + (bytes * 1000) / link
  let t = i.elapsedMs
  // The rest of the bulk copy, during which the guest keeps dirtying.
  let pending = i.dirtyBytes
  if (i.unsentBytes > 0) {
    const ms = (i.unsentBytes * 1000) / link
    t += ms
    pending = Math.min(hot, pending + (d * ms) / 1000)
  }
  const target = i.maxPauseMs
  for (let r = 0; r < MAX_SIM_ROUNDS; r++) {
    if (target !== undefined ? pauseFor(pending) <= target : pending <= 1024 * 1024)
      return { totalMs: t + pauseFor(pending), pauseMs: pauseFor(pending) }
    const ms = (pending * 1000) / link
    const next = Math.min(hot, (d * ms) / 1000)
    if (next >= pending * 0.9) {
      // Not shrinking: with no bound on the pause, stop-and-copy what is left; with one, no convergence.
      if (target === undefined) return { totalMs: t + ms + pauseFor(next), pauseMs: pauseFor(next) }
      return undefined
    }
    t += ms
    pending = next
  }
  return undefined
}

/**
 * Post-copy from here: the rest of the bulk copy (cold RAM), the switch, then every owed byte once.
 * The owed set is what is dirty at the switch: bounded by the working set.
 */
export function predictPostcopy(i: EstimateInput): { totalMs: number; pauseMs: number } | undefined {
  const link = i.linkBytesPerSec
  if (!(link > 0)) return undefined
  const hot = i.hotBytes > 0 ? i.hotBytes : Number.POSITIVE_INFINITY
  const bulkMs = (i.unsentBytes * 1000) / link
  const owed = Math.min(hot, i.dirtyBytes + (i.dirtyBytesPerSec * bulkMs) / 1000)
  const pauseMs = switchCostMs(i)
  return { totalMs: i.elapsedMs + bulkMs + pauseMs + (owed * 1000) / link, pauseMs }
}

export function estimate(i: EstimateInput): Estimate {
  const link = i.linkBytesPerSec
  const outstanding = i.unsentBytes + i.dirtyBytes
  const cost = switchCostMs(i)
  const minTotalMs = link > 0 ? i.elapsedMs + (outstanding * 1000) / link + cost : Number.POSITIVE_INFINITY
  const confident = i.linkMeasuredMs >= MIN_MEASURE_MS && i.dirtyMeasuredMs > 0
  const pre = predictPrecopy(i)
  // Pre-copy that converges only thanks to a link it barely outruns is a gamble: demand a margin.
  // (or one whose whole working set fits the pause anyway).
  const hotFits =
    i.hotBytes > 0 &&
    link > 0 &&
    cost + (i.hotBytes * 1000) / link <= (i.maxPauseMs ?? Number.POSITIVE_INFINITY)
  const preOk = pre !== undefined && (i.dirtyBytesPerSec < link * CONVERGE_SHARE || hotFits)
  const post = i.postcopy ? predictPostcopy(i) : undefined
  let mode: MoveMode = 'precopy'
  let chosen = pre
  const fitsPause = (p: { pauseMs: number } | undefined) =>
    p !== undefined && (i.maxPauseMs === undefined || p.pauseMs <= i.maxPauseMs)
  const fitsDeadline = (p: { totalMs: number } | undefined) =>
    p !== undefined && (i.deadlineMs === undefined || p.totalMs <= i.deadlineMs)
  if (!(preOk && fitsPause(pre) && fitsDeadline(pre)) && post !== undefined) {
    // Post-copy when pre-copy would not converge, would pause too long, or would end too late.
    mode = 'postcopy'
    chosen = post
  }
  const e: Estimate = {
    linkBytesPerSec: link,
    dirtyBytesPerSec: i.dirtyBytesPerSec,
    outstandingBytes: outstanding,
    minTotalMs,
    mode,
    totalMs: chosen?.totalMs ?? Number.POSITIVE_INFINITY,
    pauseMs: chosen?.pauseMs ?? (link > 0 ? cost + (Math.max(outstanding, i.hotBytes) * 1000) / link : cost),
    precopyConverges: preOk,
    confident,
  }
  if (i.deadlineMs !== undefined && confident) {
    // Judged on the best case of any mode available: post-copy's, else pre-copy's own prediction.
    const best = i.postcopy ? minTotalMs : (pre?.totalMs ?? Number.POSITIVE_INFINITY)
    e.feasible = best <= i.deadlineMs
    if (!e.feasible) e.shortfallMs = best - i.deadlineMs
  }
  return e
}

const MB = 1e6
const fmtS = (ms: number) => (Number.isFinite(ms) ? `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s` : '∞')
const fmtMB = (bps: number) => `${(bps / MB).toFixed(1)} MB/s`
const fmtMiB = (b: number) => `${(b / (1024 * 1024)).toFixed(0)} MiB`

/** One line for people: "needs ≥ 27 s at 15.8 MB/s (412 MiB to send); the guest dirties 67.1 MB/s". */
export function describeEstimate(e: Estimate): string {
  return `needs ≥ ${fmtS(e.minTotalMs)} at ${fmtMB(e.linkBytesPerSec)} (${fmtMiB(e.outstandingBytes)} to send); the guest dirties ${fmtMB(e.dirtyBytesPerSec)}; plan ${e.mode}: ~${fmtS(e.totalMs)} in all, paused ~${Math.round(e.pauseMs)} ms`
}
