/**
 * When to throttle harder: QEMU's auto-converge rule (more throttle while the guest dirties more than a
 * share of what the link sends), with steps that go much deeper than QEMU's 20%/+10%: a TCG guest that
 * mostly writes memory needs almost no CPU to do it (measured here: `memcheck` rewriting 64 MiB/s used
 * ~5% of a CPU, and its dirty rate did not drop below 64 MiB/s until the vCPU got 1% of a CPU; 0.5% gave
 * 12–14 MiB/s, 0.25% 3–5 MiB/s). The policy is a pure function, tested on recorded traces.
 */
import type { CpuLimiter } from './interfaces.ts'

/** The throttle levels in order (level = share of CPU taken away from each vCPU). */
export const THROTTLE_LEVELS = [0, 0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995] as const

export interface ThrottleInput {
  level: number
  /** The guest's dirty rate measured since the level was set, bytes/s. */
  dirtyBytesPerSec: number
  linkBytesPerSec: number
  /** How long the level has been in force, ms (a new level needs a moment to show). */
  sinceChangeMs: number
}

export interface ThrottlePolicy {
  /** Throttle harder while dirty > share × link (QEMU: 50%). */
  share: number
  /** Wait at least this long at a level before judging it. */
  settleMs: number
  /** Never beyond this level (a guest at 99.5% barely answers the network: ~1-2 s per request). */
  maxLevel: number
}

export const DEFAULT_POLICY: ThrottlePolicy = { share: 0.5, settleMs: 1000, maxLevel: 0.995 }

/**
 * The next level: one step up while the guest still outruns the link, two when it outruns it fourfold
 * (the response is very non-linear: the first steps often change nothing). Never down during a move.
 */
export function nextThrottleLevel(i: ThrottleInput, policy: ThrottlePolicy = DEFAULT_POLICY): number {
  if (i.sinceChangeMs < policy.settleMs) return i.level
  if (!(i.linkBytesPerSec > 0)) return i.level
  if (i.dirtyBytesPerSec <= policy.share * i.linkBytesPerSec) return i.level
  const at = THROTTLE_LEVELS.findIndex((l) => l > i.level)
  if (at < 0) return i.level
  const steps = i.dirtyBytesPerSec > 4 * i.linkBytesPerSec ? 2 : 1
  const next = THROTTLE_LEVELS[Math.min(at + steps - 1, THROTTLE_LEVELS.length - 1)]!
  return Math.min(next, policy.maxLevel)
}

/** One level's effect as measured: what the report and the traces carry. */
export interface ThrottleStep {
  level: number
  atMs: number
  /** Dirty rate measured at the previous level just before this one, bytes/s. */
  dirtyBeforeBytesPerSec: number
}

/**
 * Applies the policy to a limiter as dirty rounds come in. `observe()` after every dirty measurement;
 * `lift()` when the move ends, whichever way.
 */
export class ThrottleController {
  readonly steps: ThrottleStep[] = []
  private changedAt: number
  private lifted = false

  constructor(
    private readonly limiter: CpuLimiter,
    private readonly now: () => number = () => performance.now(),
    private readonly policy: ThrottlePolicy = DEFAULT_POLICY,
  ) {
    this.changedAt = now()
  }

  get level(): number {
    return this.limiter.level
  }

  /** The highest level used (the report's). */
  get maxLevel(): number {
    return this.steps.reduce((m, s) => Math.max(m, s.level), 0)
  }

  /** Feeds one measurement; raises the throttle when the policy says so. Returns the level now. */
  async observe(dirtyBytesPerSec: number, linkBytesPerSec: number): Promise<number> {
    if (this.lifted) return 0
    const t = this.now()
    const next = nextThrottleLevel(
      {
        level: this.limiter.level,
        dirtyBytesPerSec,
        linkBytesPerSec,
        sinceChangeMs: t - this.changedAt,
      },
      this.policy,
    )
    if (next !== this.limiter.level) {
      await this.limiter.set(next)
      this.steps.push({ level: next, atMs: t, dirtyBeforeBytesPerSec: dirtyBytesPerSec })
      this.changedAt = t
    }
    return this.limiter.level
  }

  async lift(): Promise<void> {
    if (this.lifted) return
    this.lifted = true
    await this.limiter.lift()
  }
}
