/**
 * When pre-copy stops and the source pauses the guest: a pure function of what the last round saw, so
 * that the policy is tested as a table (test/unit/migration-switch.test.ts) and changed in one place.
 *
 * Extending it: add fields to SwitchInput and, for a new way to end pre-copy, an `action` of
 * SwitchDecision; source.ts's pre-copy loop switches over `action` exhaustively, so a new action does
 * not compile until the loop handles it. With a bound on the pause (--max-pause, or --deadline's
 * default of 1 s) a move that pre-copy cannot finish within it ends in post-copy when the destination
 * can page (action 'postcopy'); without post-copy the vCPU throttle gets its rounds first.
 * A best-effort move under a deadline (an evacuation: the deadline is the host's death) takes post-copy
 * as soon as the rest does not fit the pause (reason 'best-effort'): another round resends the pending
 * set and still has to switch after it, while post-copy pushes that set once with the guest running
 * there, so post-copy always ends first. Session 8's bench evacuate: 2 runs in 16 chose a round
 * because the estimate said pre-copy converges, resent 300+ MB in 8.7-9.5 s, then went to post-copy
 * anyway (+5-7 s each).
 */

/** Why pre-copy ended (the report's `switchReason`). */
export type SwitchReason = 'small' | 'not-shrinking' | 'max-rounds' | 'deadline' | 'fits-pause'

/** Why pre-copy handed over to post-copy (the report's `switchReason` too). */
export type PostcopyReason =
  | 'requested'
  | 'best-effort'
  | 'dirty-rate'
  | 'not-shrinking'
  | 'max-rounds'
  | 'deadline'

export interface SwitchInput {
  /** Pre-copy rounds sent after the bulk copy so far (0 = only the bulk copy). */
  round: number
  /** What the guest dirtied since the last pass (all streams): the next round, or the final delta. */
  pendingBytes: number
  /** pendingBytes at the previous decision that chose another round (undefined before the first). */
  prevPendingBytes?: number
  /** What finding the pending set cost (a further round costs another such scan). */
  scanMs: number
  /** The send rate the last round achieved, bytes/s (0 = none measured yet). */
  sendRateBytesPerSec: number
  /** Now, on the same clock as deadlineAtMs (performance.now()). */
  nowMs: number
  /** The whole move must end by atMs (the user's --deadline of `ms`). */
  deadline?: { atMs: number; ms: number }
  /** --best-effort (every evacuation): with a deadline, ending soonest is all that counts. */
  bestEffort?: boolean
  /** Switch once the pending set is at most this (tuning.switchBytes). */
  switchBytes: number
  /** At most this many pre-copy rounds (tuning.maxRounds). */
  maxRounds: number
  /** The longest pause the user allows (--max-pause; 1 s by default with --deadline). */
  maxPauseMs?: number
  /** What switching now would pause the guest for: the pending set over the link, and the switch. */
  predictedPauseMs?: number
  /** Post-copy: not possible, possible when pre-copy cannot keep the pause bound, or asked for. */
  postcopy?: 'no' | 'allowed' | 'requested'
  /** The estimator's verdict: pre-copy can still reach a pause within maxPauseMs. */
  precopyConverges?: boolean
  /** The vCPU throttle can still go up: a round that did not shrink may shrink at the next level. */
  throttleHeadroom?: boolean
}

export type SwitchDecision =
  | { action: 'round' }
  | { action: 'switch'; reason: SwitchReason }
  | { action: 'postcopy'; reason: PostcopyReason }

/** Assumed send rate before a round measured one (bytes/s). */
export const DEFAULT_RATE_GUESS = 50 * 1024 * 1024
/** Fixed cost assumed for the switch itself (pause, device state, commit round trip, resume), ms. */
export const SWITCH_OVERHEAD_MS = 1000
/** Share of the deadline kept as a margin for what the source cannot see. */
export const DEADLINE_MARGIN = 0.2
/** A round that does not shrink the dirty set by at least 10% is not worth another one. */
export const SHRINK_FACTOR = 0.9

export function decideSwitch(i: SwitchInput): SwitchDecision {
  if (i.pendingBytes <= i.switchBytes) return { action: 'switch', reason: 'small' }
  if (i.postcopy === 'requested') return { action: 'postcopy', reason: 'requested' }
  const bound = i.maxPauseMs !== undefined
  // With a bound on the pause, post-copy is how a move that pre-copy cannot finish in time ends.
  const post = bound && i.postcopy === 'allowed'
  const end = (reason: SwitchReason & PostcopyReason): SwitchDecision =>
    post ? { action: 'postcopy', reason } : { action: 'switch', reason }
  if (bound && i.predictedPauseMs !== undefined && i.predictedPauseMs <= i.maxPauseMs!)
    return { action: 'switch', reason: 'fits-pause' }
  if (post && i.precopyConverges === false) return { action: 'postcopy', reason: 'dirty-rate' }
  if (post && i.bestEffort === true && i.deadline !== undefined)
    return { action: 'postcopy', reason: 'best-effort' }
  if (
    i.round >= 1 &&
    i.prevPendingBytes !== undefined &&
    i.pendingBytes >= i.prevPendingBytes * SHRINK_FACTOR
  ) {
    // Throttling takes a few levels to bite (see vm/throttle/controller.ts): give it those rounds.
    if (!post && i.throttleHeadroom === true && i.round < i.maxRounds) return { action: 'round' }
    return end('not-shrinking')
  }
  if (i.round >= i.maxRounds) return end('max-rounds')
  if (i.deadline !== undefined) {
    // Another round costs its send time plus a scan; the switch needs the final delta, the device state
    // and the resume. Keep a margin of a fifth of the deadline for what we cannot see.
    const rate = i.sendRateBytesPerSec > 0 ? i.sendRateBytesPerSec : DEFAULT_RATE_GUESS
    const roundMs = (i.pendingBytes * 1000) / rate + i.scanMs
    const switchMs = SWITCH_OVERHEAD_MS + (i.pendingBytes * 1000) / rate
    if (i.nowMs + roundMs + switchMs > i.deadline.atMs - i.deadline.ms * DEADLINE_MARGIN)
      return end('deadline')
  }
  return { action: 'round' }
}
