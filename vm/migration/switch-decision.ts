/**
 * When pre-copy stops and the source pauses the guest: a pure function of what the last round saw, so
 * that the policy is tested as a table (test/unit/migration-switch.test.ts) and changed in one place.
 *
 * Extending it (deadline feasibility, throttling, post-copy): add fields to SwitchInput and a new
 * `action` to SwitchDecision; source.ts's pre-copy loop switches over `action` exhaustively, so a new
 * action does not compile until the loop handles it.
 */

/** Why pre-copy ended (the report's `switchReason`). */
export type SwitchReason = 'small' | 'not-shrinking' | 'max-rounds' | 'deadline'

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
  /** Switch once the pending set is at most this (tuning.switchBytes). */
  switchBytes: number
  /** At most this many pre-copy rounds (tuning.maxRounds). */
  maxRounds: number
}

export type SwitchDecision = { action: 'round' } | { action: 'switch'; reason: SwitchReason }

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
  if (
    i.round >= 1 &&
    i.prevPendingBytes !== undefined &&
    i.pendingBytes >= i.prevPendingBytes * SHRINK_FACTOR
  )
    return { action: 'switch', reason: 'not-shrinking' }
  if (i.round >= i.maxRounds) return { action: 'switch', reason: 'max-rounds' }
  if (i.deadline !== undefined) {
    // Another round costs its send time plus a scan; the switch needs the final delta, the device state
    // and the resume. Keep a margin of a fifth of the deadline for what we cannot see.
    const rate = i.sendRateBytesPerSec > 0 ? i.sendRateBytesPerSec : DEFAULT_RATE_GUESS
    const roundMs = (i.pendingBytes * 1000) / rate + i.scanMs
    const switchMs = SWITCH_OVERHEAD_MS + (i.pendingBytes * 1000) / rate
    if (i.nowMs + roundMs + switchMs > i.deadline.atMs - i.deadline.ms * DEADLINE_MARGIN)
      return { action: 'switch', reason: 'deadline' }
  }
  return { action: 'round' }
}
