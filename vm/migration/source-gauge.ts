/**
 * What a move out knows while it runs (moved out of source.ts): the progress counters and events, the
 * link's send rate and the guest's dirty rate, the estimate and the deadline's verdict (estimate.ts),
 * and the vCPU throttle that helps a pre-copy converge (throttle/controller.ts). The session
 * (source.ts) feeds it what each phase measured and reads the numbers back for decideSwitch() and the
 * report; the gauge never changes the session's state, it only stops the move through `abort` when the
 * deadline cannot be met.
 */
import { describeError } from '../../src/base/errors.ts'
import type { Vm } from '../driver/interfaces.ts'
import { ThrottleController } from '../throttle/controller.ts'
import type { Conversation } from './conversation.ts'
import { MigrationInfeasibleError } from './errors.ts'
import { describeEstimate, type Estimate, estimate, RateMeter, WindowRate } from './estimate.ts'
import type { MigrationEstimate, MigrationPhase, MigrationProgress, MigrationReport } from './interfaces.ts'
import type { PostcopyLender } from './postcopy-source.ts'
import type { RamSender } from './ram-sender.ts'
import type { SourceInit } from './source-options.ts'
import type { SourceState, StateMachine } from './state.ts'

/** The link's rate is measured from this long after the first send (the buffers fill at once). */
const RATE_SKIP_MS = 250

const fmtMs = (ms: number) => (ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`)

export interface GaugeInit {
  init: SourceInit
  vm: Vm
  name: string
  /** performance.now() when the move started. */
  started: number
  chunkSize: number
  maxPauseMs: number | undefined
  conv: Conversation
  ram: RamSender
  machine: StateMachine<SourceState>
  signal: AbortSignal
  /** The session's step timings (logged with the verdict). */
  timings: Record<string, number>
  postcopyPolicy(): 'no' | 'allowed' | 'requested'
  rttMs(): number
  lender(): PostcopyLender | undefined
  /** Stops the move: the deadline cannot be met. */
  abort(err: MigrationInfeasibleError): void
}

export class SourceGauge {
  // Progress counters (emit() reports them).
  phase: MigrationPhase = 'prepare'
  round = 0
  dirtyRate = 0
  dirtyBytes = 0
  ramBytes = 0
  dedupBytes = 0
  phaseBytes: number | undefined
  phaseDone = 0
  private lastEmit = 0
  private lastWire = 0
  private lastAt: number
  private rate = 0

  // Know before you promise (estimate.ts): the link's send rate, the guest's dirty rate.
  readonly link = new WindowRate(3000)
  readonly dirty = new RateMeter(2000)
  lastScanMs = 100
  lastEstimate: Estimate | undefined
  judged: MigrationEstimate | undefined
  infeasible: MigrationInfeasibleError | undefined
  private sendingSince = 0
  private ticker: NodeJS.Timeout | undefined
  private lastProbeAt = 0
  private firstSample = true

  throttleCtl: ThrottleController | undefined
  throttleBackend = ''
  private throttleTried = false

  constructor(private readonly g: GaugeInit) {
    this.lastAt = g.started
  }

  private nameOf(peer: string): string {
    return this.g.init.nameOf?.(peer) ?? peer
  }

  emit(force = false, message?: string): void {
    const { g } = this
    const now = performance.now()
    if (!force && now - this.lastEmit < 200) return
    if (now - this.lastAt >= 100) {
      this.rate = ((g.conv.wireBytes - this.lastWire) * 1000) / (now - this.lastAt)
      this.lastWire = g.conv.wireBytes
      this.lastAt = now
    }
    this.lastEmit = now
    const p: MigrationProgress = {
      vm: g.name,
      phase: this.phase,
      round: this.round,
      wireBytes: g.conv.wireBytes,
      ramBytes: this.ramBytes,
      dedupBytes: this.dedupBytes,
      rateBytesPerSec: this.rate,
      dirtyRateBytesPerSec: this.dirtyRate,
      dirtyBytes: this.dirtyBytes,
      elapsedMs: now - g.started,
    }
    if (this.phaseBytes !== undefined) {
      p.phaseBytes = this.phaseBytes
      p.phaseDoneBytes = this.phaseDone
    }
    if (message !== undefined) p.message = message
    p.from = this.nameOf(g.init.network.self)
    p.to = this.nameOf(g.init.to)
    if (this.lastEstimate !== undefined) p.estimate = this.summary(this.lastEstimate)
    if (this.throttleCtl !== undefined) p.throttle = this.throttleCtl.level
    const lender = g.lender()
    if (lender !== undefined) {
      const owed = lender.stats.owedChunks * g.chunkSize
      p.postcopyRemainingBytes = lender.remaining * g.chunkSize
      if (g.machine.is('postcopy')) {
        p.phaseBytes = owed
        p.phaseDoneBytes = owed - p.postcopyRemainingBytes
      }
    }
    g.init.onProgress?.(p)
  }

  summary(e: Estimate): MigrationEstimate {
    const out: MigrationEstimate = {
      linkBytesPerSec: Math.round(e.linkBytesPerSec),
      dirtyBytesPerSec: Math.round(e.dirtyBytesPerSec),
      outstandingBytes: e.outstandingBytes,
      hotBytes: this.g.ram.hotBytes,
      minTotalMs: Math.round(e.minTotalMs),
      totalMs: Math.round(e.totalMs),
      pauseMs: Math.round(e.pauseMs),
      mode: e.mode,
    }
    if (e.feasible !== undefined) out.feasible = e.feasible
    return out
  }

  /** The estimate from what was measured so far. */
  estimateNow(): Estimate {
    const { g } = this
    const now = performance.now()
    if (!this.firstSample) this.link.sample(now, g.conv.sentBytes)
    const inBulk = g.machine.is('bulk')
    const rttMs = g.rttMs()
    const e = estimate({
      elapsedMs: now - g.started,
      unsentBytes: inBulk ? Math.max(0, g.ram.bulkRemainingBytes) : 0,
      dirtyBytes: inBulk ? g.ram.deferredBytes : this.dirtyBytes,
      dirtyBytesPerSec: this.dirty.rate,
      hotBytes: g.ram.hotBytes,
      linkBytesPerSec: this.link.rate,
      linkMeasuredMs: this.link.spanMs,
      dirtyMeasuredMs: this.dirty.spanMs,
      rttMs: Number.isFinite(rttMs) ? rttMs : 0,
      scanMs: this.lastScanMs,
      postcopy: g.postcopyPolicy() !== 'no',
      ...(g.init.deadlineMs === undefined ? {} : { deadlineMs: g.init.deadlineMs }),
      ...(g.maxPauseMs === undefined ? {} : { maxPauseMs: g.maxPauseMs }),
    })
    this.lastEstimate = e
    return e
  }

  /**
   * Every half second while the guest runs here: sample the link, probe the dirty rate during the bulk
   * copy (about once a second), refresh the estimate, and judge the deadline once the numbers are good
   * enough. A deadline no mode can meet stops the move at once (unless --best-effort): the guest was
   * never paused, nothing of it runs elsewhere.
   */
  private async tick(): Promise<void> {
    const { g } = this
    const now = performance.now()
    if (this.sendingSince === 0) return
    // The first moments fill the channel's buffers faster than the link drains them: not a rate.
    if (now - this.sendingSince < RATE_SKIP_MS) return
    if (this.link.spanMs === 0 && this.firstSample) {
      this.firstSample = false
      this.link.sample(now, g.conv.sentBytes)
    }
    if (g.machine.is('bulk') && now - this.lastProbeAt >= 1000) {
      this.lastProbeAt = now
      const r = await g.ram.probe(g.signal).catch(() => undefined)
      if (r !== undefined) {
        this.dirty.add(r.intervalMs, r.dirtyBytes)
        this.lastScanMs = r.scanMs
        this.dirtyRate = this.dirty.rate
        await this.maybeThrottle()
      }
    }
    const e = this.estimateNow()
    this.emit()
    if (this.judged === undefined && e.confident) {
      this.judged = this.summary(e)
      // With the steps so far: where the seconds before a verdict went (a refusal must come early).
      g.init.log.info('migration estimate', {
        vm: g.name,
        to: g.init.to,
        ...this.judged,
        afterMs: Math.round(now - g.started),
        steps: JSON.stringify(g.timings),
      })
      if (e.feasible === false && g.init.bestEffort !== true) {
        this.infeasible = new MigrationInfeasibleError(
          `VM '${g.name}' cannot move to ${g.init.to} within ${fmtMs(g.init.deadlineMs!)}: ${describeEstimate(e)}; the VM keeps running here untouched (--best-effort moves it anyway, as fast as it can)`,
        )
        g.abort(this.infeasible)
      }
    }
  }

  startTicker(): void {
    if (this.ticker !== undefined) return
    this.sendingSince = performance.now()
    let busy = false
    this.ticker = setInterval(() => {
      if (busy) return
      busy = true
      void this.tick()
        .catch((err: unknown) =>
          this.g.init.log.debug('estimate tick failed', { vm: this.g.name, error: describeError(err) }),
        )
        .finally(() => {
          busy = false
        })
    }, 250)
    this.ticker.unref()
  }

  stopTicker(): void {
    if (this.ticker !== undefined) clearInterval(this.ticker)
    this.ticker = undefined
  }

  /**
   * Pre-copy that must converge (no post-copy here) throttles the guest's vCPUs while it dirties more
   * than half of what the link carries (throttle/controller.ts), from the first measurement on.
   */
  async maybeThrottle(): Promise<void> {
    const { g } = this
    const provider = g.init.throttle
    if (provider === undefined || g.postcopyPolicy() !== 'no') return
    if (this.throttleCtl === undefined) {
      if (this.throttleTried || this.dirty.rate <= this.link.rate * 0.5 || this.link.spanMs < 500) return
      this.throttleTried = true
      const pid = g.vm.pid
      if (pid === undefined) return
      try {
        const limiter = await provider.forProcess(pid, g.name)
        this.throttleBackend = limiter.backend
        this.throttleCtl = new ThrottleController(limiter)
      } catch (err) {
        g.init.log.warn('cannot throttle the guest; pre-copy goes on without', {
          vm: g.name,
          error: describeError(err),
        })
        return
      }
    }
    try {
      const before = this.throttleCtl.level
      const level = await this.throttleCtl.observe(this.dirty.rate, this.link.rate)
      if (level !== before)
        g.init.log.info('throttling the guest', {
          vm: g.name,
          level,
          dirtyBytesPerSec: Math.round(this.dirty.rate),
        })
    } catch (err) {
      g.init.log.warn('throttle step failed', { vm: g.name, error: describeError(err) })
    }
  }

  /** Ends the throttle (the guest is paused for the switch, or runs here again after a rollback). */
  async liftThrottle(): Promise<void> {
    await this.throttleCtl?.lift().catch((err: unknown) =>
      this.g.init.log.error('lifting the vCPU throttle failed', {
        vm: this.g.name,
        error: describeError(err),
      }),
    )
  }

  /**
   * The report's estimate and throttle: the estimate the move was judged on; a move over before the
   * rates were measured well enough keeps the last one (without a verdict).
   */
  reportInto(report: MigrationReport): void {
    const est = this.judged ?? (this.lastEstimate === undefined ? undefined : this.summary(this.lastEstimate))
    if (est !== undefined) report.estimate = est
    if (this.throttleCtl !== undefined)
      report.throttle = {
        maxLevel: this.throttleCtl.maxLevel,
        steps: this.throttleCtl.steps.length,
        backend: this.throttleBackend,
      }
  }
}
