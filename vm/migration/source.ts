/**
 * The source of a live migration: one SourceSession per move, its progress in one state field (see
 * state.ts: SOURCE_TRANSITIONS), each phase a method that starts with its transition. What moves live
 * is a list of SourceStreams (RAM: ram-sender.ts, disk: vm/disk/sender.ts); the device state is this
 * file's business because it goes last, after every stream's final part. When pre-copy ends is
 * decideSwitch() (switch-decision.ts). A failure anywhere ends in fail(), which reads what to do from
 * the state (sourceFailureOutcome).
 *
 * Around the session, each in its own file: its options and defaults (source-options.ts), what it
 * measures and reports while it runs — progress, rates, the estimate and deadline verdict, the vCPU
 * throttle (source-gauge.ts) — and the post-copy lending across link cuts (postcopy-source.ts).
 * Why this file is still ~750 lines: what is left IS the state machine — the phases in the order of
 * the table, fail() and rollback() beside them — and reads top to bottom as one move; cutting the
 * phases apart would scatter the transitions that the table and ARCHITECTURE.md describe in one place.
 */
import { open } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { AbortError, describeError, MeshError, throwIfAborted } from '../../src/base/errors.ts'
import { DiskSender } from '../disk/sender.ts'
import type { Vm } from '../driver/interfaces.ts'
import { parseImageRef } from '../spec.ts'
import { Conversation } from './conversation.ts'
import {
  MigrationInDoubtError,
  MigrationLinkError,
  MigrationLostError,
  MigrationRollbackError,
} from './errors.ts'
import { switchCostMs } from './estimate.ts'
import { faultPoint } from './fault-points.ts'
import type { MigrationPhase, MigrationReport } from './interfaces.ts'
import { chunkBitmap, lendUntilPlaced, PostcopyLender, postcopyReport } from './postcopy-source.ts'
import { startProbe } from './probe.ts'
import { PAGE_SIZE } from './ram.ts'
import { RamSender } from './ram-sender.ts'
import { lostMessage, recordLoss, resolveInDoubt } from './settle.ts'
import { SourceGauge } from './source-gauge.ts'
import {
  DEFAULT_MAX_PAUSE_MS,
  type MigrationTuning,
  SOURCE_DEFAULTS,
  type SourceInit,
} from './source-options.ts'
import { SOURCE_TRANSITIONS, type SourceState, StateMachine, sourceFailureOutcome } from './state.ts'
import type { SourceContext, SourceStream } from './stream.ts'
import { decideSwitch, type PostcopyReason, type SwitchReason } from './switch-decision.ts'
import {
  encodeStateDelta,
  MAX_STATE_BYTES,
  type Message,
  newSessionId,
  TARGET_MESSAGE_BYTES,
} from './v1/messages.ts'

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

/** How often a rollback tries to resume the paused guest (100, 200, 400 ms apart). */
const ROLLBACK_RESUME_TRIES = 4

const fmtBytes = (b: number) => `${(b / (1024 * 1024)).toFixed(1)} MiB`

// The options live in source-options.ts; callers keep importing them from here.
export { DEFAULT_MAX_PAUSE_MS, type MigrationTuning, type SourceInit } from './source-options.ts'

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
  /** Progress, rates, the estimate and the throttle (source-gauge.ts). */
  private readonly gauge: SourceGauge

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

  /** The session's own abort: an infeasible deadline stops the move from a timer. */
  private readonly ac = new AbortController()
  private readonly signal: AbortSignal
  /** The pause bound (--max-pause, or the deadline's default), if any. */
  private readonly maxPauseMs: number | undefined
  /** The destination said it can page a post-copy move. */
  private postcopyOk = false
  private postcopyReason: PostcopyReason | undefined
  private lender: PostcopyLender | undefined
  private postcopyStartedPerf = 0
  private postcopyDone: Extract<Message, { type: 'pcdone' }> | undefined
  private pumping: Promise<void> | undefined
  /** Sessions the destination came back on after a link cut (closed with the session). */
  private readonly resumedConvs: Conversation[] = []

  constructor(private readonly init: SourceInit) {
    this.t = { ...SOURCE_DEFAULTS, ...init.tuning }
    this.vm = init.vm
    this.name = init.vm.spec.name
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
    this.gauge = new SourceGauge({
      init,
      vm: this.vm,
      name: this.name,
      started: this.started,
      chunkSize: this.t.chunkSize,
      maxPauseMs: this.maxPauseMs,
      conv: this.conv,
      ram: this.ram,
      machine: this.machine,
      signal: this.signal,
      timings: this.timings,
      postcopyPolicy: () => this.postcopyPolicy,
      rttMs: () => this.rttMs,
      lender: () => this.lender,
      abort: (err) => this.ac.abort(err),
    })
    this.ctx = {
      conv: this.conv,
      sid: this.sid,
      signal: this.signal,
      timeoutMs: this.t.timeoutMs,
      beginPhase: (bytes) => {
        this.gauge.phaseBytes = bytes
        this.gauge.phaseDone = 0
      },
      carried: (bytes, deduped = false) => {
        this.gauge.ramBytes += bytes
        this.gauge.phaseDone += bytes
        if (deduped) this.gauge.dedupBytes += bytes
        else this.gauge.emit()
      },
      lap: (step) => this.lap(step),
      sending: () => this.gauge.startTicker(),
    }
  }

  /** Post-copy can end this move: the user allows it (a pause bound, or asked) and the destination pages. */
  private get postcopyPolicy(): 'no' | 'allowed' | 'requested' {
    if (!this.postcopyOk || this.init.mode === 'precopy') return 'no'
    if (this.init.mode === 'postcopy') return 'requested'
    return this.maxPauseMs === undefined ? 'no' : 'allowed'
  }

  /** The checked transition, and the progress event its state announces. */
  private go(from: SourceState, to: SourceState, message?: string): void {
    this.machine.set(from, to)
    this.announce(to, message)
  }

  private announce(state: SourceState, message?: string): void {
    const phase = PHASE_OF[state]
    if (phase === undefined) return
    this.gauge.phase = phase
    this.gauge.emit(true, message)
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
      throw await this.fail(this.gauge.infeasible ?? err)
    } finally {
      this.stopProbe()
      this.gauge.stopTicker()
      await this.gauge.liftThrottle()
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
    // The disk: which arrival it counts writes since (a destination that kept it then starts from it).
    const diskSince = await this.disk?.claim()
    if (diskSince !== undefined) prep.diskSince = diskSince
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
      this.gauge.dirtyBytes = bytes
      if (rate > 0) this.gauge.dirty.add((bytes * 1000) / rate, bytes)
      this.gauge.dirtyRate = this.gauge.dirty.rate
      this.gauge.lastScanMs = scanMs
      await this.gauge.maybeThrottle()
      const e = this.gauge.estimateNow()
      // The link as the channel's backpressure paces it; the last round's own rate before it is known.
      const link = this.gauge.link.spanMs >= 500 ? this.gauge.link.rate : sendRate
      const decision = decideSwitch({
        round: this.gauge.round,
        pendingBytes: bytes,
        ...(prevPendingBytes === undefined ? {} : { prevPendingBytes }),
        scanMs,
        sendRateBytesPerSec: link,
        nowMs: performance.now(),
        ...(deadline === undefined ? {} : { deadline }),
        ...(init.bestEffort === true ? { bestEffort: true } : {}),
        switchBytes: this.t.switchBytes,
        maxRounds: this.t.maxRounds,
        ...(this.maxPauseMs === undefined ? {} : { maxPauseMs: this.maxPauseMs }),
        ...(link > 0
          ? { predictedPauseMs: (bytes * 1000) / link + switchCostMs({ rttMs: this.rttMs, scanMs }) }
          : {}),
        postcopy: this.postcopyPolicy,
        precopyConverges: e.precopyConverges,
        throttleHeadroom: this.gauge.throttleCtl !== undefined && this.gauge.throttleCtl.level < 0.995,
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
      this.gauge.round++
      this.gauge.phaseBytes = bytes
      this.gauge.phaseDone = 0
      this.gauge.emit(true)
      const w0 = conv.sentBytes
      const r0 = performance.now()
      for (const s of this.streams) await s.iterate(this.gauge.round, this.ctx)
      await conv.send({ type: 'round', sid, round: this.gauge.round, chunks: units, bytes }, this.signal)
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
    this.gauge.stopTicker()
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
    await this.gauge.liftThrottle()
    this.lap('pause')
    // Every stream's exact rest is found while QEMU writes out the device state. Both are waited for
    // even when one fails: QEMU ends a save in `postmigrate` (stopped), so a rollback that resumed the
    // guest while the save still ran would find it stopped again (CI, disk-kills-e2e seed 776499816:
    // the disk's final scan failed, the rollback resumed, the save ended: "rolled back: … is paused").
    const [saved, ...scans] = await Promise.allSettled([
      vm.saveState(signal),
      ...this.streams.map((s) => s.finalScan(this.ctx)),
    ])
    for (const r of [...scans, saved]) if (r.status === 'rejected') throw r.reason
    const state = (saved as PromiseFulfilledResult<Uint8Array>).value
    this.lap('saveState')
    this.deviceStateBytes = state.byteLength
    const finalRound = this.gauge.round + 1
    const w0 = conv.sentBytes
    if (post) {
      // Post-copy: the rest is owed, not sent. The lender answers page requests from now on (loading
      // the device state may touch owed chunks); the background push starts once the guest runs there.
      const count = vm.memory.size / this.t.chunkSize
      const owed = this.ram.finalChunks
      await conv.send({ type: 'owed', sid, chunks: count, bitmap: chunkBitmap(owed, count) }, signal)
      const bdp = this.gauge.link.rate * ((Number.isFinite(this.rttMs) ? this.rttMs : 50) / 1000)
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

  /**
   * postcopy: the guest runs on the destination; lend it the owed chunks (urgent first, the rest
   * hottest first) until it says all are placed, across link cuts (lendUntilPlaced, postcopy-source.ts).
   */
  private async postcopy(): Promise<void> {
    const lender = this.lender
    if (lender === undefined) return
    const { init, name, token } = this
    this.lap('resumed')
    this.machine.set('committed', 'postcopy')
    this.announce('postcopy')
    this.postcopyStartedPerf = performance.now()
    const progress = setInterval(() => this.gauge.emit(), 500)
    progress.unref()
    try {
      this.postcopyDone = await lendUntilPlaced(lender, {
        vm: name,
        token,
        to: init.to,
        toName: this.nameOf(init.to),
        ...(this.pumping === undefined ? {} : { pumping: this.pumping }),
        ...(init.awaitPostcopyResume === undefined ? {} : { awaitResume: init.awaitPostcopyResume }),
        onResumed: (conv) => this.resumedConvs.push(conv),
        finishMs: this.t.timeoutMs * 4,
        resumeMs: this.t.postcopyResumeMs,
        chunkSize: this.t.chunkSize,
        log: init.log,
        signal: this.signal,
      })
      this.pumping = undefined
    } finally {
      clearInterval(progress)
    }
    this.lap('postcopy')
  }

  /** handover: the destination runs the VM and holds the token; let go of ours. */
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
      rounds: this.gauge.round,
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
    this.gauge.reportInto(report)
    if (this.lender !== undefined) {
      report.postcopy = postcopyReport(
        this.lender,
        this.postcopyDone,
        this.postcopyStartedPerf,
        this.t.chunkSize,
      )
      report.wireBytes += this.resumedConvs.reduce((n, c) => n + c.wireBytes, 0)
    }
    if (this.disk !== undefined) {
      report.diskWrittenBytes = this.disk.writtenAtStart
      report.diskSentBytes = this.disk.sentBytes
      report.diskDedupBytes = this.disk.dedupChunks * this.t.chunkSize
      report.diskReadBytes = this.disk.readBytes
      report.diskSeeded = this.disk.seeded
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
        return await this.rollback(err)
    }
  }

  /**
   * rolling-back → rolled-back: nothing runs elsewhere; ours runs again. Returns the error to throw:
   * `err`, saying where the VM runs, or a MigrationRollbackError when ours could not be resumed.
   */
  private async rollback(err: unknown): Promise<unknown> {
    const { vm, init, name } = this
    if (this.machine.is('rolling-back', 'rolled-back')) return err
    this.machine.to('rolling-back')
    this.announce('rolling-back', describeError(err))
    this.conv.trySend({
      type: 'abort',
      sid: this.sid,
      code: (err as { code?: string }).code ?? 'E_MIGRATION',
      reason: describeError(err),
    })
    this.gauge.stopTicker()
    await this.gauge.liftThrottle()
    const resumeErr = this.machine.reached('paused') ? await this.resumeHere() : undefined
    if (this.machine.reached('switching')) await init.host.endSwitch(name).catch(() => {})
    this.machine.set('rolling-back', 'rolled-back')
    const here = this.nameOf(init.network.self)
    if (resumeErr !== undefined || (this.machine.reached('paused') && vm.status() !== 'running')) {
      // Never a quiet "rolled back" for a guest that does not run: the one copy is stopped here.
      const why = resumeErr === undefined ? 'it did not run after the resume' : describeError(resumeErr)
      init.log.error('rollback: the VM could not be resumed', { vm: name, status: vm.status(), error: why })
      return new MigrationRollbackError(
        `${describeError(err)}; the rollback could NOT resume VM '${name}' on ${here} (${why}): it is ${vm.status()} there and runs nowhere else`,
        { cause: err },
      )
    }
    // Say where the VM is now: the operator's question after a failed move.
    if (err instanceof MeshError && !(err instanceof AbortError))
      err.message = `${err.message}; rolled back: VM '${name}' is ${vm.status()} on ${here}`
    return err
  }

  /**
   * Resumes our paused copy (rollback). A failed `cont` is tried again a few times (QEMU refuses one
   * while it is still finishing a save); returns the last error if the guest still does not run.
   */
  private async resumeHere(): Promise<unknown> {
    const { vm, init, name } = this
    let last: unknown
    for (let attempt = 0; attempt < ROLLBACK_RESUME_TRIES; attempt++) {
      if (vm.status() !== 'paused') return vm.status() === 'running' ? undefined : last
      try {
        await vm.resume()
        return undefined
      } catch (resumeErr) {
        last = resumeErr
        init.log.warn('rollback: resuming the VM failed', {
          vm: name,
          attempt: attempt + 1,
          error: describeError(resumeErr),
        })
        await sleep(100 * 2 ** attempt)
      }
    }
    return last
  }
}
