/**
 * Slowing a guest down so that pre-copy can catch up with it (QEMU's auto-converge, done from outside
 * QEMU): the VM's vCPU threads get a CPU quota, raised step by step while the guest still dirties RAM
 * faster than the link carries it, and lifted when the move ends (the guest then runs on the
 * destination's QEMU, which was never throttled, or again here after a rollback).
 */
import { MeshError } from '../../src/base/errors.ts'

/** Limits the CPU time of one VM's vCPU threads. */
export interface CpuLimiter {
  /** 'cgroup2', 'cgroup1' (the cpu controller of a hybrid hierarchy), 'fake'. */
  readonly backend: string
  /** The throttle now: 0 = none, 0.9 = the vCPUs get 10% of a CPU each. */
  readonly level: number
  /** Whether only the vCPU threads are limited (else the whole QEMU process, I/O thread included). */
  readonly vcpuOnly: boolean
  /** Sets the throttle (0 ≤ level < 1; clamped to what the backend can do). */
  set(level: number): Promise<void>
  /** No limit any more, and the threads back where they were. Idempotent; never throws for a gone VM. */
  lift(): Promise<void>
}

/** Makes limiters; `available()` says whether this host can throttle at all, and why not. */
export interface ThrottleProvider {
  available(): Promise<{ ok: true; backend: string } | { ok: false; reason: string }>
  /** A limiter for the process `pid` (a QEMU whose vCPU threads are named 'CPU n/…'). */
  forProcess(pid: number, name: string): Promise<CpuLimiter>
}

/** Throttling is not possible here (no cpu controller, not root…), or a cgroup write failed. */
export class ThrottleError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_THROTTLE' })
  }
}
