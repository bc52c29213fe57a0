/**
 * The source of a live migration: one SourceSession per move, its progress in one state field (see
 * state.ts: SOURCE_TRANSITIONS), each phase a method that starts with its transition. What moves live
 * is a list of SourceStreams (RAM: ram-sender.ts); the device state is this file's business because it
 * goes last, after every stream's final part. When pre-copy ends is decideSwitch() (switch-decision.ts).
 * A failure anywhere ends in fail(), which reads what to do from the state (sourceFailureOutcome).
 */
import { open } from 'node:fs/promises'
import { AbortError, describeError, MeshError, throwIfAborted } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import { DiskSender } from '../disk/sender.ts'
import type { Vm } from '../driver/interfaces.ts'
import { parseImageRef } from '../spec.ts'
import { ThrottleController } from '../throttle/controller.ts'
import type { ThrottleProvider } from '../throttle/interfaces.ts'
import { Conversation } from './conversation.ts'
import {
  MigrationAbortedError,
  MigrationInDoubtError,
  MigrationInfeasibleError,
  MigrationLinkError,
  MigrationLostError,
  MigrationTimeoutError,
} from './errors.ts'
import { describeEstimate, type Estimate, estimate, RateMeter, switchCostMs, WindowRate } from './estimate.ts'
import { faultPoint } from './fault-points.ts'
import type {
  MigrationEstimate,
  MigrationNetwork,
  MigrationPhase,
  MigrationProgress,
  MigrationReport,
  RamCache,
  VmHost,
} from './interfaces.ts'
import { chunkBitmap, PostcopyLender } from './postcopy-source.ts'
import { startProbe } from './probe.ts'
import { PAGE_SIZE } from './ram.ts'
import { RamSender } from './ram-sender.ts'
import { lostMessage, recordLoss, resolveInDoubt } from './settle.ts'
import {
  SOURCE_TRANSITIONS,
  type SourceState,
  StateMachine,
  sourceFailureOutcome,
  type Transition,
} from './state.ts'
import type { SourceContext, SourceStream } from './stream.ts'
import { decideSwitch, type PostcopyReason, type SwitchReason } from './switch-decision.ts'
import {
  encodeStateDelta,
  MAX_STATE_BYTES,
  type Message,
  type MoveOptions,
  newSessionId,
  TARGET_MESSAGE_BYTES,
} from './v1/messages.ts'

export interface MigrationTuning {
  /** Chunk size of dirty tracking and of the destination's cache (default 64 KiB). */
  chunkSize?: number
  /** Deflate page data (default true). */
  compress?: boolean
  /** Pre-copy rounds after the bulk copy, at most (default 8). */
  maxRounds?: number
  /** Switch over once a round's dirty set is at most this many bytes (default 1 MiB). */
  switchBytes?: number
  /** Every wait for the peer (default 30 s). */
  timeoutMs?: number
  /** After commit, how long the source tries to learn whether the destination resumed (default 60 s). */
  inDoubtMs?: number
  /** How long after the move the source starts keeping the old RAM as chunks (default 2 s). */
  rememberDelayMs?: number
  /** While the guest is paused: ping the destination this often (default 200 ms; 0 = no probing)... */
  probeIntervalMs?: number
  /** ...and call it dead after this long without an answer (default 1500 ms, at least 4 RTTs). */
  deadAfterMs?: number
  /** Post-copy: how long the source waits for a destination whose link broke to come back (10 min). */
  postcopyResumeMs?: number
}

/** The link's rate is measured from this long after the first send (the buffers fill at once). */
const RATE_SKIP_MS = 250

/** The pause bound a --deadline brings when --max-pause is not given. */
export const DEFAULT_MAX_PAUSE_MS = 1000

export interface SourceInit {
  network: MigrationNetwork
  /** The service routes this session's messages to the conversation it registers. */
  register(sid: string, conv: Conversation): () => void
  host: VmHost
  cache?: RamCache
  log: Logger
  vm: Vm
  to: string
  deadlineMs?: number
  /** --max-pause, --best-effort, --mode (see MoveOptions). */
  maxPauseMs?: number
  bestEffort?: boolean
  mode?: MoveOptions['mode']
  /** Slows the guest's vCPUs while pre-copy catches up (absent: never throttled). */
  throttle?: ThrottleProvider
  /**
   * Post-copy across a link cut: resolves when the destination comes back for this VM and token on a
   * new session ('pcresume'), with that session and the owed bitmap it sent. Provided by the service.
   */
  awaitPostcopyResume?: (
    vm: string,
    token: number,
    signal?: AbortSignal,
  ) => Promise<{ conv: Conversation; bitmap: Uint8Array }>
  tuning?: MigrationTuning
  onProgress?: (p: MigrationProgress) => void
  /** Work that goes on after the move (keeping RAM chunks); the service waits for it on stop. */
  background?: (p: Promise<unknown>) => void
  /** Every state change of the session (service status, tests). */
  onState?: (t: Transition<SourceState>) => void
  /** A member's name for messages (default: its PeerId). */
  nameOf?: (peer: string) => string
  signal?: AbortSignal
}

const DEFAULTS: Required<MigrationTuning> = {
  chunkSize: 64 * 1024,
  compress: true,
  maxRounds: 8,
  switchBytes: 1024 * 1024,
  timeoutMs: 30_000,
  inDoubtMs: 60_000,
  rememberDelayMs: 2000,
  probeIntervalMs: 200,
  deadAfterMs: 1500,
  postcopyResumeMs: 600_000,
}

/** The progress phase a state announces (states not listed keep the phase they found). */
const PHASE_OF: Partial<Record<SourceState, MigrationPhase>> = {
  setup: 'prepare',
  bulk: 'bulk',
  precopy: 'precopy',
  switching: 'switch',
  postcopy: 'postcopy',
  handover: 'resumed',
  completed: 'done',
  'rolling-back': 'rollback',
}

const fmtMs = (ms: number) => (ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`)
const fmtBytes = (b: number) => `${(b / (1024 * 1024)).toFixed(1)} MiB`

/** Rejects with MigrationTimeoutError when `p` takes longer than `ms`. */
async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new MigrationTimeoutError(what, ms)), ms)
      }),
    ])
  } finally {
    clearTimeout(timer)
  }
}

/** Moves a running VM of this host to `to`. Resolves with the report once the destination runs it. */
export function migrateOut(init: SourceInit): Promise<MigrationReport> {
  return new SourceSession(init).run()
}

/** One move out: its state, its streams, its counters. Used once. */
export class SourceSession {
  readonly machine: StateMachine<SourceState>
  private readonly t: Required<MigrationTuning>
  private readonly vm: Vm
  private readonly name: string
  private readonly started = performance.now()
  private readonly conv: Conversation
  private readonly sid: string
  private readonly unregister: () => void
  private readonly token: number
  private readonly ram: RamSender
  private readonly disk: DiskSender | undefined
  /** Everything that moves live, in the order its parts are sent. */
  private readonly streams: SourceStream[]
  private readonly ctx: SourceContext

  // Progress counters (emit() reports them).
  private phase: MigrationPhase = 'prepare'
  private round = 0
  private dirtyRate = 0
  private dirtyBytes = 0
  private ramBytes = 0
  private dedupBytes = 0
  private phaseBytes: number | undefined
  private phaseDone = 0
  private lastEmit = 0
  private lastWire = 0
  private lastAt: number
  private rate = 0

  private readonly timings: Record<string, number> = {}
  private mark = performance.now()

  // What the report needs from the phases.
  private rttMs = Number.POSITIVE_INFINITY
  private offsetMs = 0
  private stateRef: Uint8Array | undefined
  private switchReason: SwitchReason | PostcopyReason = 'max-rounds'
  private pausedAt = 0
  private pausedPerf = 0
  private finalDeltaBytes = 0
  private deviceStateBytes = 0
  private deviceStateWireBytes = 0
  /** Stops the liveness probe of the pause (a no-op when none runs). */
  private stopProbe: () => void = () => {}
  /** When the destination resumed (its clock), and when we learnt it (ours). */
  private resumedAt = 0
  private resumedSeenPerf = 0

  // Know before you promise (estimate.ts): the link's send rate, the guest's dirty rate.
  /** The session's own abort: an infeasible deadline stops the move from a timer. */
  private readonly ac = new AbortController()
  private readonly signal: AbortSignal
  private readonly link = new WindowRate(3000)
  private readonly dirty = new RateMeter(2000)
  private sendingSince = 0
  private ticker: NodeJS.Timeout | undefined
  private lastProbeAt = 0
  private lastEstimate: Estimate | undefined
  private judged: MigrationEstimate | undefined
  private infeasible: MigrationInfeasibleError | undefined
  /** The pause bound (--max-pause, or the deadline's default), if any. */
  private readonly maxPauseMs: number | undefined
  /** The destination said it can page a post-copy move. */
  private postcopyOk = false
  private postcopyReason: PostcopyReason | undefined
  private throttleCtl: ThrottleController | undefined
  private throttleTried = false
  private throttleBackend = ''
  private lender: PostcopyLender | undefined
  private postcopyStartedPerf = 0
  private postcopyDone: Extract<Message, { type: 'pcdone' }> | undefined
  private pumping: Promise<void> | undefined
  /** Sessions the destination came back on after a link cut (closed with the session). */
  private readonly resumedConvs: Conversation[] = []

  constructor(private readonly init: SourceInit) {
    this.t = { ...DEFAULTS, ...init.tuning }
    this.vm = init.vm
    this.name = init.vm.spec.name
    this.lastAt = this.started
    this.signal = init.signal === undefined ? this.ac.signal : AbortSignal.any([init.signal, this.ac.signal])
    this.maxPauseMs =
      init.maxPauseMs ??
      (init.deadlineMs !== undefined || init.mode === 'postcopy' ? DEFAULT_MAX_PAUSE_MS : undefined)
    const channel = init.network.channel(init.to)
    if (channel === undefined || !channel.open)
      // Nothing was sent, nothing paused (e.g. the destination's agent died just now): say where the VM is.
      throw new MigrationLinkError(
        `no link to ${this.nameOf(init.to)}; not moved: VM '${init.vm.spec.name}' is ${init.vm.status()} on ${this.nameOf(init.network.self)}`,
      )
    this.sid = newSessionId()
    this.conv = new Conversation(channel, this.sid, init.nameOf?.(init.to))
    this.unregister = init.register(this.sid, this.conv)
    this.token = init.host.token(this.name) + 1
    this.machine = new StateMachine<SourceState>(
      `migration of '${this.name}' (out)`,
      'setup',
      SOURCE_TRANSITIONS,
      (tr) => {
        init.log.debug('migration state', {
          vm: this.name,
          to: init.to,
          was: tr.from,
          state: tr.to,
          atMs: tr.atMs,
        })
        init.onState?.(tr)
        faultPoint(`source:${tr.to}`, this.name)
      },
    )
    this.ram = new RamSender({ vm: this.vm, chunkSize: this.t.chunkSize, compress: this.t.compress })
    this.streams = [this.ram]
    // A writable disk moves alongside the RAM (vm/disk/sender.ts).
    if (this.vm.volumePath !== undefined) {
      this.disk = new DiskSender({ vm: this.vm, chunkSize: this.t.chunkSize, compress: this.t.compress })
      this.streams.push(this.disk)
    }
    this.ctx = {
      conv: this.conv,
      sid: this.sid,
      signal: this.signal,
      timeoutMs: this.t.timeoutMs,
      beginPhase: (bytes) => {
        this.phaseBytes = bytes
        this.phaseDone = 0
      },
      carried: (bytes, deduped = false) => {
        this.ramBytes += bytes
        this.phaseDone += bytes
        if (deduped) this.dedupBytes += bytes
        else this.emit()
      },
      lap: (step) => this.lap(step),
      sending: () => this.startTicker(),
    }
  }

  private emit(force = false, message?: string): void {
    const now = performance.now()
    if (!force && now - this.lastEmit < 200) return
    if (now - this.lastAt >= 100) {
      this.rate = ((this.conv.wireBytes - this.lastWire) * 1000) / (now - this.lastAt)
      this.lastWire = this.conv.wireBytes
      this.lastAt = now
    }
    this.lastEmit = now
    const p: MigrationProgress = {
      vm: this.name,
      phase: this.phase,
      round: this.round,
      wireBytes: this.conv.wireBytes,
      ramBytes: this.ramBytes,
      dedupBytes: this.dedupBytes,
      rateBytesPerSec: this.rate,
      dirtyRateBytesPerSec: this.dirtyRate,
      dirtyBytes: this.dirtyBytes,
      elapsedMs: now - this.started,
    }
    if (this.phaseBytes !== undefined) {
      p.phaseBytes = this.phaseBytes
      p.phaseDoneBytes = this.phaseDone
    }
    if (message !== undefined) p.message = message
    p.from = this.nameOf(this.init.network.self)
    p.to = this.nameOf(this.init.to)
    if (this.lastEstimate !== undefined) p.estimate = this.summary(this.lastEstimate)
    if (this.throttleCtl !== undefined) p.throttle = this.throttleCtl.level
    if (this.lender !== undefined) {
      const owed = this.lender.stats.owedChunks * this.t.chunkSize
      p.postcopyRemainingBytes = this.lender.remaining * this.t.chunkSize
      if (this.machine.is('postcopy')) {
        p.phaseBytes = owed
        p.phaseDoneBytes = owed - p.postcopyRemainingBytes
      }
    }
    this.init.onProgress?.(p)
  }

  private summary(e: Estimate): MigrationEstimate {
    const out: MigrationEstimate = {
      linkBytesPerSec: Math.round(e.linkBytesPerSec),
      dirtyBytesPerSec: Math.round(e.dirtyBytesPerSec),
      outstandingBytes: e.outstandingBytes,
      hotBytes: this.ram.hotBytes,
      minTotalMs: Math.round(e.minTotalMs),
      totalMs: Math.round(e.totalMs),
      pauseMs: Math.round(e.pauseMs),
      mode: e.mode,
    }
    if (e.feasible !== undefined) out.feasible = e.feasible
    return out
  }

  /** Post-copy can end this move: the user allows it (a pause bound, or asked) and the destination pages. */
  private get postcopyPolicy(): 'no' | 'allowed' | 'requested' {
    if (!this.postcopyOk || this.init.mode === 'precopy') return 'no'
    if (this.init.mode === 'postcopy') return 'requested'
    return this.maxPauseMs === undefined ? 'no' : 'allowed'
  }

  /** The estimate from what was measured so far. */
  private estimateNow(): Estimate {
    const now = performance.now()
    if (!this.firstSample) this.link.sample(now, this.conv.sentBytes)
    const inBulk = this.machine.is('bulk')
    const e = estimate({
      elapsedMs: now - this.started,
      unsentBytes: inBulk ? Math.max(0, this.ram.bulkRemainingBytes) : 0,
      dirtyBytes: inBulk ? this.ram.deferredBytes : this.dirtyBytes,
      dirtyBytesPerSec: this.dirty.rate,
      hotBytes: this.ram.hotBytes,
      linkBytesPerSec: this.link.rate,
      linkMeasuredMs: this.link.spanMs,
      dirtyMeasuredMs: this.dirty.spanMs,
      rttMs: Number.isFinite(this.rttMs) ? this.rttMs : 0,
      scanMs: this.lastScanMs,
      postcopy: this.postcopyPolicy !== 'no',
      ...(this.init.deadlineMs === undefined ? {} : { deadlineMs: this.init.deadlineMs }),
      ...(this.maxPauseMs === undefined ? {} : { maxPauseMs: this.maxPauseMs }),
    })
    this.lastEstimate = e
    return e
  }

  private lastScanMs = 100

  /**
   * Every half second while the guest runs here: sample the link, probe the dirty rate during the bulk
   * copy (about once a second), refresh the estimate, and judge the deadline once the numbers are good
   * enough. A deadline no mode can meet stops the move at once (unless --best-effort): the guest was
   * never paused, nothing of it runs elsewhere.
   */
  private async tick(): Promise<void> {
    const now = performance.now()
    if (this.sendingSince === 0) return
    // The first moments fill the channel's buffers faster than the link drains them: not a rate.
    if (now - this.sendingSince < RATE_SKIP_MS) return
    if (this.link.spanMs === 0 && this.firstSample) {
      this.firstSample = false
      this.link.sample(now, this.conv.sentBytes)
    }
    if (this.machine.is('bulk') && now - this.lastProbeAt >= 1000) {
      this.lastProbeAt = now
      const r = await this.ram.probe(this.signal).catch(() => undefined)
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
      this.init.log.info('migration estimate', {
        vm: this.name,
        to: this.init.to,
        ...this.judged,
        afterMs: Math.round(now - this.started),
        steps: JSON.stringify(this.timings),
      })
      if (e.feasible === false && this.init.bestEffort !== true) {
        this.infeasible = new MigrationInfeasibleError(
          `VM '${this.name}' cannot move to ${this.init.to} within ${fmtMs(this.init.deadlineMs!)}: ${describeEstimate(e)}; the VM keeps running here untouched (--best-effort moves it anyway, as fast as it can)`,
        )
        this.ac.abort(this.infeasible)
      }
    }
  }

  private firstSample = true

  private startTicker(): void {
    if (this.ticker !== undefined) return
    this.sendingSince = performance.now()
    let busy = false
    this.ticker = setInterval(() => {
      if (busy) return
      busy = true
      void this.tick()
        .catch((err: unknown) =>
          this.init.log.debug('estimate tick failed', { vm: this.name, error: describeError(err) }),
        )
        .finally(() => {
          busy = false
        })
    }, 250)
    this.ticker.unref()
  }

  private stopTicker(): void {
    if (this.ticker !== undefined) clearInterval(this.ticker)
    this.ticker = undefined
  }

  /**
   * Pre-copy that must converge (no post-copy here) throttles the guest's vCPUs while it dirties more
   * than half of what the link carries (throttle/controller.ts), from the first measurement on.
   */
  private async maybeThrottle(): Promise<void> {
    const provider = this.init.throttle
    if (provider === undefined || this.postcopyPolicy !== 'no') return
    if (this.throttleCtl === undefined) {
      if (this.throttleTried || this.dirty.rate <= this.link.rate * 0.5 || this.link.spanMs < 500) return
      this.throttleTried = true
      const pid = this.vm.pid
      if (pid === undefined) return
      try {
        const limiter = await provider.forProcess(pid, this.name)
        this.throttleBackend = limiter.backend
        this.throttleCtl = new ThrottleController(limiter)
      } catch (err) {
        this.init.log.warn('cannot throttle the guest; pre-copy goes on without', {
          vm: this.name,
          error: describeError(err),
        })
        return
      }
    }
    try {
      const before = this.throttleCtl.level
      const level = await this.throttleCtl.observe(this.dirty.rate, this.link.rate)
      if (level !== before)
        this.init.log.info('throttling the guest', {
          vm: this.name,
          level,
          dirtyBytesPerSec: Math.round(this.dirty.rate),
        })
    } catch (err) {
      this.init.log.warn('throttle step failed', { vm: this.name, error: describeError(err) })
    }
  }

  /** Ends the throttle (the guest is paused for the switch, or runs here again after a rollback). */
  private async liftThrottle(): Promise<void> {
    await this.throttleCtl
      ?.lift()
      .catch((err: unknown) =>
        this.init.log.error('lifting the vCPU throttle failed', { vm: this.name, error: describeError(err) }),
      )
  }

  /** The checked transition, and the progress event its state announces. */
  private go(from: SourceState, to: SourceState, message?: string): void {
    this.machine.set(from, to)
    this.announce(to, message)
  }

  private announce(state: SourceState, message?: string): void {
    const phase = PHASE_OF[state]
    if (phase === undefined) return
    this.phase = phase
    this.emit(true, message)
  }

  private nameOf(peer: string): string {
    return this.init.nameOf?.(peer) ?? peer
  }

  private lap(step: string): void {
    const now = performance.now()
    this.timings[step] = Math.round((now - this.mark) * 10) / 10
    this.mark = now
  }

  async run(): Promise<MigrationReport> {
    try {
      await this.setup()
      await this.bulk()
      await this.precopy()
      await this.pause()
      await this.commit()
      await this.postcopy()
      return await this.handover()
    } catch (err) {
      throw await this.fail(this.infeasible ?? err)
    } finally {
      this.stopProbe()
      this.stopTicker()
      await this.liftThrottle()
      this.lender?.close()
      this.unregister()
      this.conv.close()
      for (const c of this.resumedConvs) c.close()
      for (const s of this.streams) await s.close()
    }
  }

  /** setup: prepare → accept, then the clocks. */
  private async setup(): Promise<void> {
    const { vm, name, conv, sid, init } = this
    const signal = this.signal
    throwIfAborted(signal)
    if (vm.status() !== 'running') throw new MigrationLinkError(`VM '${name}' is ${vm.status()}, not running`)
    const images = [vm.spec.kernel, vm.spec.initrd, vm.spec.disk].filter(
      (v): v is string => v !== undefined && parseImageRef(v) !== undefined,
    )
    this.announce('setup', `to ${init.to}`)
    const prep: Message = {
      type: 'prepare',
      sid,
      spec: vm.spec,
      token: this.token,
      ramSize: vm.memory.size,
      chunkSize: this.t.chunkSize,
      pageSize: PAGE_SIZE,
      images,
    }
    if (init.deadlineMs !== undefined) prep.deadlineMs = init.deadlineMs
    // Ask whether the destination can page, whenever this move might end in post-copy.
    if (init.mode !== 'precopy' && (this.maxPauseMs !== undefined || init.mode === 'postcopy'))
      prep.postcopy = true
    await conv.send(prep, signal)
    const accept = await conv.next(['accept'], 'accept', this.t.timeoutMs, signal)
    this.postcopyOk = prep.postcopy === true && accept.postcopy === true
    if (init.mode === 'postcopy' && !this.postcopyOk)
      throw new MigrationLinkError(`${init.to} cannot receive a post-copy move (no pager there)`)

    // Clocks and RTT: the best of three pings, to turn the destination's timestamps into ours.
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now()
      const p0 = performance.now()
      await conv.send({ type: 'ping', sid, t0 }, signal)
      const pong = await conv.next(['pong'], 'pong', this.t.timeoutMs, signal)
      const rtt = performance.now() - p0
      if (rtt < this.rttMs) {
        this.rttMs = rtt
        this.offsetMs = pong.t1 - (t0 + rtt / 2)
      }
    }
    this.lap('prepare')
  }

  /** bulk: every stream's first full pass, then round 0 ends. */
  private async bulk(): Promise<void> {
    this.go('setup', 'bulk')
    let bytes = 0
    let units = 0
    for (const s of this.streams) {
      const r = await s.bulk(this.ctx)
      bytes += r.bytes
      units += r.units
    }
    await this.conv.send({ type: 'round', sid: this.sid, round: 0, chunks: units, bytes }, this.signal)
    this.lap('bulk')
  }

  /** Device state in message-sized pieces (at least one, even when empty). */
  private async sendPieces(type: 'state' | 'stateref', bytes: Uint8Array): Promise<void> {
    for (let o = 0; o < bytes.byteLength || o === 0; o += TARGET_MESSAGE_BYTES) {
      const piece = bytes.subarray(o, o + TARGET_MESSAGE_BYTES)
      await this.conv.send(
        { type, sid: this.sid, offset: o, total: bytes.byteLength, bytes: piece },
        this.signal,
      )
      if (bytes.byteLength === 0) break
    }
  }

  /**
   * A reference copy of the device state, sent while the guest runs (stopped only for the save's few
   * ms): at the switch only its difference travels. QEMU's device state is mostly ROM blocks that never
   * change (~360 KB → a few KB; across NATs the migrate channel may move only ~5 MB/s, so this is tens
   * of ms of downtime).
   */
  private async sendStateRef(): Promise<void> {
    const { vm, init } = this
    if (vm.snapshotState === undefined) return
    try {
      this.stateRef = await vm.snapshotState(this.signal)
    } catch (err) {
      if (err instanceof AbortError) throw err
      // Not fatal: the switch then sends the whole state, as it would without a snapshot.
      init.log.warn('device state snapshot failed; the switch sends the whole state', {
        vm: this.name,
        error: describeError(err),
      })
    }
    if (this.stateRef !== undefined && this.stateRef.byteLength > MAX_STATE_BYTES) this.stateRef = undefined
    if (this.stateRef !== undefined) await this.sendPieces('stateref', this.stateRef)
    this.lap('stateRef')
  }

  /** precopy: rounds of what the guest dirtied, until decideSwitch() says switch. */
  private async precopy(): Promise<void> {
    this.go('bulk', 'precopy')
    await this.sendStateRef()
    const { init, conv, sid } = this
    const deadline =
      init.deadlineMs === undefined
        ? undefined
        : { atMs: this.started + init.deadlineMs, ms: init.deadlineMs }
    let prevPendingBytes: number | undefined
    let sendRate = 0
    for (;;) {
      let bytes = 0
      let units = 0
      let rate = 0
      let scanMs = 0
      for (const s of this.streams) {
        const p = await s.pending(this.ctx)
        bytes += p.bytes
        units += p.units
        rate += p.rateBytesPerSec
        scanMs += p.scanMs
      }
      this.dirtyBytes = bytes
      if (rate > 0) this.dirty.add((bytes * 1000) / rate, bytes)
      this.dirtyRate = this.dirty.rate
      this.lastScanMs = scanMs
      await this.maybeThrottle()
      const e = this.estimateNow()
      // The link as the channel's backpressure paces it; the last round's own rate before it is known.
      const link = this.link.spanMs >= 500 ? this.link.rate : sendRate
      const decision = decideSwitch({
        round: this.round,
        pendingBytes: bytes,
        ...(prevPendingBytes === undefined ? {} : { prevPendingBytes }),
        scanMs,
        sendRateBytesPerSec: link,
        nowMs: performance.now(),
        ...(deadline === undefined ? {} : { deadline }),
        switchBytes: this.t.switchBytes,
        maxRounds: this.t.maxRounds,
        ...(this.maxPauseMs === undefined ? {} : { maxPauseMs: this.maxPauseMs }),
        ...(link > 0
          ? { predictedPauseMs: (bytes * 1000) / link + switchCostMs({ rttMs: this.rttMs, scanMs }) }
          : {}),
        postcopy: this.postcopyPolicy,
        precopyConverges: e.precopyConverges,
        throttleHeadroom: this.throttleCtl !== undefined && this.throttleCtl.level < 0.995,
      })
      switch (decision.action) {
        case 'switch':
          this.switchReason = decision.reason
          this.lap('rounds')
          return
        case 'postcopy':
          this.postcopyReason = decision.reason
          this.switchReason = decision.reason
          this.lap('rounds')
          return
        case 'round':
          break
        default: {
          const never: never = decision
          throw new Error(`unhandled switch decision ${JSON.stringify(never)}`)
        }
      }
      prevPendingBytes = bytes
      this.round++
      this.phaseBytes = bytes
      this.phaseDone = 0
      this.emit(true)
      const w0 = conv.sentBytes
      const r0 = performance.now()
      for (const s of this.streams) await s.iterate(this.round, this.ctx)
      await conv.send({ type: 'round', sid, round: this.round, chunks: units, bytes }, this.signal)
      const ms = performance.now() - r0
      if (ms > 5) sendRate = ((conv.sentBytes - w0) * 1000) / ms
    }
  }

  /** switching → paused: record the switch, pause, send the rest and the device state, wait for 'ready'. */
  private async pause(): Promise<void> {
    const { vm, init, conv, sid, token } = this
    const signal = this.signal
    // Recorded (persisted) before the pause: an agent killed from here on leaves a paused QEMU that
    // the next agent must settle with the destination instead of resuming it blindly.
    this.stopTicker()
    const post = this.postcopyReason !== undefined
    this.go('precopy', 'switching', post ? `post-copy (${this.switchReason})` : this.switchReason)
    await init.host.beginSwitch({
      vm: this.name,
      token,
      to: init.to,
      at: Date.now(),
      ...(post ? { mode: 'postcopy' as const } : {}),
    })
    this.pausedAt = Date.now()
    this.pausedPerf = performance.now()
    // The state says paused before the call: a pause that fails half-way is still resumed on rollback.
    this.go('switching', 'paused')
    await vm.pause(signal)
    // Paused: the throttle has done its work (after a rollback the guest runs here at full speed again).
    await this.liftThrottle()
    this.lap('pause')
    // Every stream's exact rest is found while QEMU writes out the device state.
    const [state] = await Promise.all([
      vm.saveState(signal),
      ...this.streams.map((s) => s.finalScan(this.ctx)),
    ])
    this.lap('saveState')
    this.deviceStateBytes = state.byteLength
    const finalRound = this.round + 1
    const w0 = conv.sentBytes
    if (post) {
      // Post-copy: the rest is owed, not sent. The lender answers page requests from now on (loading
      // the device state may touch owed chunks); the background push starts once the guest runs there.
      const count = vm.memory.size / this.t.chunkSize
      const owed = this.ram.finalChunks
      await conv.send({ type: 'owed', sid, chunks: count, bitmap: chunkBitmap(owed, count) }, signal)
      const bdp = this.link.rate * ((Number.isFinite(this.rttMs) ? this.rttMs : 50) / 1000)
      this.lender = new PostcopyLender({
        ramPath: vm.memory.path,
        ramSize: vm.memory.size,
        chunkSize: this.t.chunkSize,
        order: this.ram.hottestFirst(owed),
        windowBytes: Math.max(512 * 1024, Math.round(2 * bdp)),
        log: init.log,
        ...(signal === undefined ? {} : { signal }),
      })
      this.lender.attach(conv)
      this.pumping = this.lender.pump()
      this.pumping.catch(() => {})
    } else for (const s of this.streams) await s.sendFinal(finalRound, this.ctx)
    this.finalDeltaBytes = conv.sentBytes - w0
    const s0 = conv.sentBytes
    const zstate = await encodeStateDelta(sid, state, this.stateRef)
    if (zstate !== undefined) await conv.sendRaw(zstate, signal)
    // Too big for one message even deflated (or empty): the plain pieces.
    else await this.sendPieces('state', state)
    this.deviceStateWireBytes = conv.sentBytes - s0
    await conv.send(
      {
        type: 'final',
        sid,
        token,
        round: finalRound,
        pausedAt: this.pausedAt,
        ...(post ? { postcopy: true } : {}),
      },
      signal,
    )
    this.lap('finalSend')
    // From here we only wait: a destination that died must not keep the guest paused for the link's
    // dead timer (or our timeout). Nothing else is queued behind the pings now.
    if (this.t.probeIntervalMs > 0) {
      const channel = init.network.channel(init.to)
      if (channel !== undefined)
        this.stopProbe = startProbe({
          channel,
          register: init.register,
          intervalMs: this.t.probeIntervalMs,
          deadAfterMs: Math.max(this.t.deadAfterMs, 4 * this.rttMs),
          peerName: this.nameOf(init.to),
          onDead: (err) => {
            init.log.warn('the destination stopped answering while the guest is paused', {
              vm: this.name,
              state: this.machine.state,
              error: err.message,
            })
            conv.fail(err)
          },
        })
    }
    await conv.next(['ready'], 'ready (destination loaded the state)', this.t.timeoutMs, signal)
    this.lap('ready')
  }

  /** committed: the point of no return. Ends in handover, or declined / in doubt (both throw). */
  private async commit(): Promise<void> {
    const { init, conv, sid, token, name } = this
    const signal = this.signal
    // From here the source never resumes unless it learns that the destination did not (and never will).
    this.go('paused', 'committed')
    await conv.send({ type: 'commit', sid, token }, signal)
    try {
      const r = await conv.next(['resumed'], 'resumed', this.t.timeoutMs, signal)
      this.resumedAt = r.resumedAt
      this.resumedSeenPerf = performance.now()
      this.stopProbe()
    } catch (err) {
      this.stopProbe()
      if (err instanceof AbortError) throw err
      init.log.warn('commit sent but no answer: asking the destination', {
        vm: name,
        error: describeError(err),
      })
      const outcome = await resolveInDoubt(init, init.to, name, token, this.t.inDoubtMs)
      if (outcome === 'lost') {
        // Its copy ran and is gone: ours is older. Never resumed quietly: recorded, reported, kept paused.
        await recordLoss(init.host, init.log, name, token, init.to)
        this.machine.set('committed', 'lost')
        throw new MigrationLostError(
          lostMessage(name, token, this.nameOf(init.to), this.nameOf(init.network.self)),
          {
            cause: err,
          },
        )
      }
      if (outcome !== 'running' && outcome !== 'postcopy') {
        this.machine.set('committed', 'declined')
        throw new MigrationLinkError(`${this.nameOf(init.to)} did not resume it (${outcome})`, { cause: err })
      }
      this.resumedAt = Date.now()
      this.resumedSeenPerf = performance.now()
    }
  }

  /** handover: the destination runs the VM and holds the token; let go of ours. */
  /**
   * postcopy: the guest runs on the destination; lend it the owed chunks (urgent first, the rest
   * hottest first) until it says all are placed. A broken link is waited out: the destination comes
   * back with 'pcresume' on a new session and the lender goes on from what it still lacks.
   */
  private async postcopy(): Promise<void> {
    const lender = this.lender
    if (lender === undefined) return
    const { init, name, token } = this
    this.lap('resumed')
    this.machine.set('committed', 'postcopy')
    this.announce('postcopy')
    this.postcopyStartedPerf = performance.now()
    const progress = setInterval(() => this.emit(), 500)
    progress.unref()
    const comeback = `the destination ${this.nameOf(init.to)} to come back for the rest of its memory`
    try {
      lender.startBackground()
      for (;;) {
        // The destination may come back on a new session at any time: after a link cut both ends see,
        // or when it judged ours dead while we did not (then ours is dropped for the new one).
        const stopWaiting = new AbortController()
        const resume = init.awaitPostcopyResume?.(
          name,
          token,
          AbortSignal.any([this.signal, stopWaiting.signal]),
        )
        resume?.catch(() => {})
        const work = (async () => {
          await (this.pumping ?? lender.pump())
          return lender.finished(this.t.timeoutMs * 4)
        })()
        work.catch(() => {})
        const r = await Promise.race([
          work.then(
            (done) => ({ done }),
            (err: unknown) => ({ err }),
          ),
          ...(resume === undefined ? [] : [resume.then((back) => ({ back }))]),
        ])
        this.pumping = undefined
        if ('done' in r) {
          stopWaiting.abort()
          this.postcopyDone = r.done
          break
        }
        let back: { conv: Conversation; bitmap: Uint8Array }
        if ('back' in r) back = r.back
        else {
          const err = r.err
          // Our own abort, the destination's (it lost the VM), or nobody to wait for: no going on.
          if (err instanceof AbortError || err instanceof MigrationAbortedError || resume === undefined) {
            stopWaiting.abort()
            throw err
          }
          init.log.warn('post-copy: the link to the destination broke; waiting for it to come back', {
            vm: name,
            to: init.to,
            owedBytes: lender.remaining * this.t.chunkSize,
            error: describeError(err),
          })
          back = await withTimeout(resume, this.t.postcopyResumeMs, comeback).catch((e: unknown) => {
            stopWaiting.abort()
            throw e
          })
        }
        lender.current?.fail(new MigrationLinkError('post-copy went on on a new session'))
        this.resumedConvs.push(back.conv)
        lender.attach(back.conv, back.bitmap)
        init.log.info('post-copy: the destination is back', {
          vm: name,
          owedBytes: lender.remaining * this.t.chunkSize,
        })
      }
    } finally {
      clearInterval(progress)
    }
    this.lap('postcopy')
  }

  private async handover(): Promise<MigrationReport> {
    const { vm, init, name, token } = this
    if (this.lender === undefined) this.lap('resumed')
    this.machine.to('handover')
    const downtimeSourceMs = Math.max(0, this.resumedSeenPerf - this.pausedPerf - this.rttMs / 2)
    const downtimeMs = Math.max(0, this.resumedAt - this.offsetMs - this.pausedAt)
    this.announce('handover')
    await init.host.setToken(name, token)
    for (const s of this.streams) await s.close()
    // Hold the RAM file open across stop() (which deletes it) so its chunks can still be kept.
    const kept = init.cache === undefined ? undefined : await open(vm.memory.path, 'r').catch(() => undefined)
    await vm.stop()
    await init.host.release(name)
    await init.host.endSwitch(name)
    const report: MigrationReport = {
      vm: name,
      from: init.network.self,
      to: init.to,
      token,
      totalMs: performance.now() - this.started,
      downtimeMs,
      downtimeSourceMs,
      rttMs: this.rttMs,
      wireBytes: this.conv.wireBytes,
      dedupBytes: (this.ram.dedupChunks + (this.disk?.dedupChunks ?? 0)) * this.t.chunkSize,
      dupPageBytes: this.ram.dupPageBytes,
      ramBytes: this.ram.ramAtStart,
      rounds: this.round,
      finalDeltaBytes: this.finalDeltaBytes,
      deviceStateBytes: this.deviceStateBytes,
      deviceStateWireBytes: this.deviceStateWireBytes,
      stateRefBytes: this.stateRef?.byteLength ?? 0,
      switchReason: this.switchReason,
      timings: this.timings,
      mode: this.lender === undefined ? 'precopy' : 'postcopy',
    }
    if (init.deadlineMs !== undefined) {
      report.deadlineMs = init.deadlineMs
      const missed = report.totalMs - init.deadlineMs
      if (missed > 0) report.deadlineMissedByMs = Math.round(missed)
    }
    if (this.maxPauseMs !== undefined) report.maxPauseMs = this.maxPauseMs
    // The estimate the move was judged on; a move over before the rates were measured well enough keeps
    // the last one (without a verdict).
    const est = this.judged ?? (this.lastEstimate === undefined ? undefined : this.summary(this.lastEstimate))
    if (est !== undefined) report.estimate = est
    if (this.throttleCtl !== undefined)
      report.throttle = {
        maxLevel: this.throttleCtl.maxLevel,
        steps: this.throttleCtl.steps.length,
        backend: this.throttleBackend,
      }
    if (this.lender !== undefined) {
      const d = this.postcopyDone
      report.postcopy = {
        owedBytes: this.lender.stats.owedChunks * this.t.chunkSize,
        ms: Math.round(performance.now() - this.postcopyStartedPerf),
        faults: d?.faults ?? 0,
        maxFaultWaitMs: Math.round((d?.maxWaitUs ?? 0) / 1000),
        zeroFaults: d?.zeroFaults ?? 0,
        urgentChunks: this.lender.stats.urgentChunks,
        backgroundChunks: this.lender.stats.backgroundChunks,
        sessions: this.lender.stats.sessions,
      }
      report.wireBytes += this.resumedConvs.reduce((n, c) => n + c.wireBytes, 0)
    }
    if (this.disk !== undefined) {
      report.diskWrittenBytes = this.disk.writtenAtStart
      report.diskSentBytes = this.disk.sentBytes
      report.diskDedupBytes = this.disk.dedupChunks * this.t.chunkSize
    }
    if (init.nameOf !== undefined) {
      report.fromName = this.nameOf(init.network.self)
      report.toName = this.nameOf(init.to)
    }
    this.go('handover', 'completed')
    if (kept !== undefined && init.cache !== undefined) {
      // Keep the last RAM as chunks so a later move back here sends only what changed. Not at once:
      // hashing the RAM costs ~0.5 s of CPU, and the guest's first moments on its new host need this
      // host's switch (held frames, stragglers) and the CPU more (measured: stalls seen by a client).
      const cache = init.cache
      // A move back that comes sooner brings it forward (cache.settled): it needs these chunks.
      const p = cache
        .remember(name, `/proc/self/fd/${kept.fd}`, this.t.chunkSize, { delayMs: this.t.rememberDelayMs })
        .catch((err: unknown) =>
          init.log.warn('keeping RAM chunks failed', { vm: name, error: describeError(err) }),
        )
        .finally(() => kept.close())
      if (init.background !== undefined) init.background(p)
      else void p
    }
    return report
  }

  /** Whatever failed: what the state says to do about it. Returns the error to throw. */
  private async fail(err: unknown): Promise<unknown> {
    const { vm, init, name } = this
    const state = this.machine.state
    switch (sourceFailureOutcome(state)) {
      case 'moved':
        // The destination runs the VM: ours must never run again, whatever failed while letting go.
        init.log.error('cleanup after a successful move failed', { vm: name, error: describeError(err) })
        await vm.stop().catch(() => {})
        await init.host.release(name).catch(() => {})
        await init.host.endSwitch(name).catch(() => {})
        if (state === 'handover') this.machine.set('handover', 'completed')
        return err
      case 'in-doubt':
        // After the commit, only an answer from the destination ('discarded', 'absent') lets us resume;
        // without one the VM stays paused (in doubt) and the switch record stays: the service settles it
        // (settle.ts) once the destination answers.
        if (state === 'committed') this.machine.set('committed', 'in-doubt')
        init.log.error('migration in doubt: the VM stays paused here', {
          vm: name,
          error: describeError(err),
        })
        return err instanceof MigrationInDoubtError
          ? err
          : new MigrationInDoubtError(
              `VM '${name}': ${describeError(err)}; it stays paused here (on ${this.nameOf(init.network.self)}) until ${this.nameOf(init.to)} says whether it resumed (this host keeps asking)`,
              { cause: err },
            )
      case 'lost':
        return err
      case 'lent': {
        // The guest runs there on memory partly still here: keep our paused copy and its switch record;
        // the service lends the rest when the destination comes back (pcresume).
        if (state === 'postcopy') this.machine.set('postcopy', 'lent')
        const owed = (this.lender?.remaining ?? 0) * this.t.chunkSize
        init.log.error('post-copy unfinished: the VM runs on the destination, part of its memory only here', {
          vm: name,
          to: init.to,
          owedBytes: owed,
          error: describeError(err),
        })
        return new MigrationLinkError(
          `VM '${name}' runs on ${this.nameOf(init.to)} but ${fmtBytes(owed)} of its memory is still only here: ${describeError(err)}; this host keeps its paused copy and sends the rest when ${this.nameOf(init.to)} comes back (never resumed here)`,
          { cause: err },
        )
      }
      case 'rollback':
        await this.rollback(err)
        return err
    }
  }

  /** rolling-back → rolled-back: nothing runs elsewhere; ours runs again. */
  private async rollback(err: unknown): Promise<void> {
    const { vm, init, name } = this
    if (this.machine.is('rolling-back', 'rolled-back')) return
    this.machine.to('rolling-back')
    this.announce('rolling-back', describeError(err))
    this.conv.trySend({
      type: 'abort',
      sid: this.sid,
      code: (err as { code?: string }).code ?? 'E_MIGRATION',
      reason: describeError(err),
    })
    this.stopTicker()
    await this.liftThrottle()
    if (this.machine.reached('paused') && vm.status() === 'paused') {
      try {
        await vm.resume()
      } catch (resumeErr) {
        init.log.error('rollback: resuming the VM failed', { vm: name, error: describeError(resumeErr) })
      }
    }
    if (this.machine.reached('switching')) await init.host.endSwitch(name).catch(() => {})
    this.machine.set('rolling-back', 'rolled-back')
    // Say where the VM is now: the operator's question after a failed move.
    if (err instanceof MeshError && !(err instanceof AbortError))
      err.message = `${err.message}; rolled back: VM '${name}' is ${vm.status()} on ${this.nameOf(init.network.self)}`
  }
}
