/**
 * The destination of a live migration: one session per incoming move, its progress in one state field
 * (state.ts: DESTINATION_TRANSITIONS). Each stream's messages go to its DestinationStream (RAM:
 * ram-receiver.ts); the device state (reference copy and final delta) is handled here because the VM
 * loads it once, at 'final'. The guest resumes only on the source's commit.
 */

import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import { DiskReceiver } from '../disk/receiver.ts'
import { checkBaseHere } from '../disk/volume.ts'
import type { Vm } from '../driver/interfaces.ts'
import { type Pager, PostcopyError, startPager } from '../postcopy/pager.ts'
import type { Conversation } from './conversation.ts'
import {
  MigrationDecodeError,
  MigrationError,
  MigrationLostError,
  MigrationRefusedError,
  StaleTokenError,
} from './errors.ts'
import { faultPoint } from './fault-points.ts'
import type { MigrationNetwork, MigrationProgress, RamCache, VmHost } from './interfaces.ts'
import { bitmapChunks, PostcopyReceiver, runPostcopy } from './postcopy-dest.ts'
import { RamReceiver } from './ram-receiver.ts'
import { DESTINATION_TRANSITIONS, type DestinationState, StateMachine, type Transition } from './state.ts'
import type { DestinationContext, DestinationStream } from './stream.ts'
import { applyStateDelta, type Message, type MessageType } from './v1/messages.ts'

type Prepare = Extract<Message, { type: 'prepare' }>

export interface DestinationInit {
  conv: Conversation
  prepare: Prepare
  host: VmHost
  cache?: RamCache
  log: Logger
  /** Longest silence from the source before the destination gives up (default 30 s). */
  timeoutMs?: number
  onProgress?: (p: MigrationProgress) => void
  /** Every state change of the session (service status, tests). */
  onState?: (t: Transition<DestinationState>) => void
  /** A member's name for messages (default: its PeerId), and this host's. */
  nameOf?: (peer: string) => string
  selfName?: string
  /** Whether this host can page a post-copy move (vm/postcopy: root, gcc, userfaultfd). */
  postcopy?: () => Promise<boolean>
  /** For post-copy across a link cut: new sessions to the source (the service's network and routing). */
  network?: MigrationNetwork
  register?: (sid: string, conv: Conversation) => () => void
  /** How long a post-copy waits for the source to come back before the VM counts as lost (10 min). */
  postcopyResumeMs?: number
  signal?: AbortSignal
}

/** What a destination session ended as; kept by the service to answer the source's 'query'. */
export type DestinationOutcome = 'running' | 'discarded'

/**
 * Receives a VM. Refuses stale tokens; writes chunks into its own RAM file while an incoming VM starts
 * next to it; loads the device state; resumes only on the source's commit. On any failure before that
 * the incoming VM is stopped and its RAM file removed, so nothing of the attempt remains.
 */
export function migrateIn(init: DestinationInit): Promise<DestinationOutcome> {
  return new DestinationSession(init).run()
}

/** Device state arriving in pieces (state, stateref): checks order and size. */
class Pieces {
  private readonly parts: Buffer[] = []
  total = -1
  got = 0
  constructor(private readonly what: string) {}
  add(m: { offset: number; total: number; bytes: Uint8Array }): void {
    if (this.total === -1) this.total = m.total
    if (m.total !== this.total || m.offset !== this.got)
      throw new MigrationDecodeError(`${this.what} pieces out of order`)
    this.parts.push(Buffer.from(m.bytes))
    this.got += m.bytes.byteLength
  }
  get complete(): boolean {
    return this.total !== -1 && this.got === this.total
  }
  concat(): Buffer {
    return Buffer.concat(this.parts)
  }
  clear(): void {
    this.parts.length = 0
  }
}

export class DestinationSession {
  readonly machine: StateMachine<DestinationState>
  private readonly name: string
  private readonly sid: string
  private readonly timeoutMs: number
  private readonly started = performance.now()
  private readonly startAbort = new AbortController()
  private ramPath: string | undefined
  private vm: Vm | undefined
  private vmStart: Promise<Vm> | undefined
  private streams: DestinationStream[] = []
  private round = 0
  private lastEmit = 0
  private canPage = false
  private owedBitmap: Uint8Array | undefined
  private pager: Pager | undefined
  private receiver: PostcopyReceiver | undefined
  /** Sessions after a link cut in post-copy (closed at the end). */
  private readonly extra: { conv: Conversation; unregister: () => void }[] = []

  constructor(private readonly init: DestinationInit) {
    this.name = init.prepare.spec.name
    this.sid = init.conv.sid
    this.timeoutMs = init.timeoutMs ?? 30_000
    this.machine = new StateMachine<DestinationState>(
      `migration of '${this.name}' (in)`,
      'preparing',
      DESTINATION_TRANSITIONS,
      (tr) => {
        init.log.debug('migration state', {
          vm: this.name,
          from: init.conv.channel.peer,
          was: tr.from,
          state: tr.to,
          atMs: tr.atMs,
        })
        init.onState?.(tr)
        faultPoint(`destination:${tr.to}`, this.name)
      },
    )
  }

  private emit(phase: MigrationProgress['phase'], force = false): void {
    const now = performance.now()
    if (!force && now - this.lastEmit < 250) return
    this.lastEmit = now
    let written = 0
    let cached = 0
    for (const s of this.streams) {
      written += s.writtenBytes
      cached += s.cachedBytes
    }
    this.init.onProgress?.({
      vm: this.name,
      phase,
      round: this.round,
      wireBytes: this.init.conv.wireBytes,
      ramBytes: written,
      dedupBytes: cached,
      rateBytesPerSec: 0,
      dirtyRateBytesPerSec: 0,
      dirtyBytes: 0,
      elapsedMs: now - this.started,
      ...(this.receiver === undefined
        ? {}
        : { postcopyRemainingBytes: this.receiver.remaining * this.init.prepare.chunkSize }),
    })
  }

  async run(): Promise<DestinationOutcome> {
    const { signal } = this.init
    const abortNow = () => this.startAbort.abort(signal?.reason)
    const offAbort = onAbort(signal, abortNow)
    try {
      this.check()
      await this.prepare()
      await this.receive()
      await this.awaitCommit()
      return await this.resume()
    } catch (err) {
      return await this.fail(err)
    } finally {
      offAbort()
      for (const s of this.streams) s.close()
      this.receiver?.close()
      for (const x of this.extra) {
        x.unregister()
        x.conv.close()
      }
    }
  }

  /** Why this host knows a newer token, and what the operator can do about it. */
  private staleDetail(have: number): string {
    const { host, conv } = this.init
    const name = this.name
    const self = this.nameOf(undefined)
    const last = host.ledger
      .history(name)
      .filter((e) => e.token === have)
      .at(-1)
    const when = last === undefined ? '' : ` at ${new Date(last.at).toISOString()}`
    const who = (p: string | undefined) => (p === undefined || p === '' ? self : this.nameOf(p))
    const what =
      last === undefined
        ? `${self} has seen token ${have} for it`
        : last.event === 'in'
          ? `${self} took it over from ${who(last.peer)} under token ${have}${when}`
          : last.event === 'out'
            ? `it moved from ${self} to ${who(last.peer)} under token ${have}${when}`
            : last.event === 'lost'
              ? `its copy under token ${have} (on ${who(last.peer)}) was lost${when}`
              : `${self} recorded '${last.event}' under token ${have}${when}`
    const lost = host.ledger.lost(name)
    return `${what}${lost === undefined ? '' : ' and that copy is gone'}; the copy on ${this.nameOf(conv.channel.peer)} is older than one the mesh has run. See 'mesh vm tokens ${name}'. To keep the copy on ${this.nameOf(conv.channel.peer)} anyway (losing newer state), run 'mesh vm recover ${name} --accept-loss' there: it takes a token newer than any member has seen, and the move can be retried`
  }

  /** A member's name for messages; undefined = this host. */
  private nameOf(peer: string | undefined): string {
    if (peer === undefined) return this.init.selfName ?? 'this host'
    return this.init.nameOf?.(peer) ?? peer
  }

  /** preparing → refused: a stale token, a VM of that name here already, a bad geometry. */
  private check(): void {
    const { conv, prepare, host } = this.init
    const refuse = (code: string, reason: string, err: Error): never => {
      conv.trySend({ type: 'refuse', sid: this.sid, code, reason })
      this.machine.set('preparing', 'refused')
      throw err
    }
    const have = host.token(this.name)
    if (prepare.token <= have) {
      const err = new StaleTokenError(this.name, prepare.token, have, this.staleDetail(have))
      refuse(err.code, err.message, err)
    }
    if (host.get(this.name) !== undefined) {
      const reason = `VM '${this.name}' already runs on ${conv.channel.peer === '' ? 'this host' : 'the destination'}`
      refuse('E_VM_EXISTS', reason, new MigrationRefusedError(reason))
    }
    if (prepare.ramSize % prepare.chunkSize !== 0) {
      const reason = 'RAM size is not a multiple of the chunk size'
      refuse('E_BAD_GEOMETRY', reason, new MigrationDecodeError(reason))
    }
  }

  /** preparing → receiving: RAM file, the incoming VM starting alongside, 'accept'. */
  private async prepare(): Promise<void> {
    const { conv, prepare, host, log, signal } = this.init
    const spec = prepare.spec
    // A disk base given as a path must be here already: fail before anything is sent, saying why.
    if (spec.volume !== undefined) await checkBaseHere(spec.volume)
    // A VM that left here moments ago comes back: its old RAM must be in the cache before we say which
    // chunks we hold (the source keeps it a couple of seconds after a move, off the guest's first moments).
    await this.init.cache?.settled(this.name)
    this.ramPath = await host.allocateRam(spec, signal)
    this.streams = [new RamReceiver(this.ramPath, prepare.ramSize, prepare.chunkSize, this.init.cache, log)]
    // A writable disk moves too: its chunks go into the incoming VM's disk through QEMU's NBD server.
    if (spec.volume !== undefined)
      this.streams.push(new DiskReceiver(() => this.vmStart, this.init.cache, log, prepare.diskSince))
    // Start the incoming VM now: it boots (and waits) while the RAM arrives, off the downtime. Its disk
    // starts from the one the VM left here if the source counts writes since that move.
    const seed = spec.volume === undefined ? undefined : prepare.diskSince
    this.vmStart = host.startIncoming(
      spec,
      this.ramPath,
      this.startAbort.signal,
      seed === undefined ? undefined : { volumeSeed: seed },
    )
    this.vmStart.catch(() => {}) // observed at 'final'
    this.canPage = prepare.postcopy === true && (await this.init.postcopy?.().catch(() => false)) === true
    await conv.send(
      { type: 'accept', sid: this.sid, cachedChunks: 0, ...(this.canPage ? { postcopy: true } : {}) },
      signal,
    )
    this.machine.set('preparing', 'receiving')
    log.info('receiving VM', { vm: this.name, from: conv.channel.peer, token: prepare.token })
  }

  /** receiving → loaded: every stream's messages and the device state until 'final'; load; 'ready'. */
  private async receive(): Promise<void> {
    const { conv, prepare, signal } = this.init
    const ctx: DestinationContext = { conv, sid: this.sid, signal }
    const byType = new Map<MessageType, DestinationStream>()
    for (const s of this.streams) for (const t of s.types) byType.set(t, s)
    const state = new Pieces('device state')
    /** The source's reference copy of the device state (stateref), which a zstate may be sent against. */
    const ref = new Pieces('reference device state')
    let zstate: Buffer | undefined
    const types: MessageType[] = [
      ...byType.keys(),
      'round',
      'state',
      'stateref',
      'zstate',
      'owed',
      'final',
      'ping',
    ]
    for (;;) {
      const m = await conv.next(types, 'the source', this.timeoutMs, signal)
      const stream = byType.get(m.type)
      if (stream !== undefined) {
        await stream.handle(m, ctx)
        this.emit(m.type === 'offer' ? 'bulk' : this.round === 0 ? 'bulk' : 'precopy')
        continue
      }
      switch (m.type) {
        case 'ping':
          await conv.send({ type: 'pong', sid: this.sid, t0: m.t0, t1: Date.now() }, signal)
          break
        case 'round':
          this.round = m.round + 1
          this.emit('precopy', true)
          break
        case 'stateref':
          ref.add(m)
          break
        case 'zstate': {
          if (state.total !== -1 || zstate !== undefined)
            throw new MigrationDecodeError('device state sent twice')
          const whole = m.xor && ref.complete ? ref.concat() : undefined
          zstate = applyStateDelta(m, whole)
          ref.clear()
          break
        }
        case 'state':
          if (zstate !== undefined) throw new MigrationDecodeError('device state sent twice')
          state.add(m)
          break
        case 'owed':
          if (!this.canPage)
            throw new MigrationDecodeError('owed chunks, but this host did not offer post-copy')
          if (m.chunks !== prepare.ramSize / prepare.chunkSize)
            throw new MigrationDecodeError(
              `owed: ${m.chunks} chunks for ${prepare.ramSize / prepare.chunkSize}`,
            )
          this.owedBitmap = m.bitmap
          break
        case 'final': {
          if (m.token !== prepare.token) throw new StaleTokenError(this.name, m.token, prepare.token)
          if (zstate === undefined && (!state.complete || state.total <= 0))
            throw new MigrationDecodeError('final before the whole device state')
          if (m.postcopy === true && this.owedBitmap === undefined)
            throw new MigrationDecodeError('post-copy final without the owed chunks')
          this.emit('switch', true)
          faultPoint('destination:final', this.name)
          this.vm = await this.vmStart!
          for (const s of this.streams) await s.beforeLoad?.(ctx)
          if (m.postcopy === true) await this.startPaging(this.vm, this.owedBitmap!)
          await this.vm.loadState(zstate ?? state.concat(), signal)
          await conv.send({ type: 'ready', sid: this.sid, loadedAt: Date.now() }, signal)
          this.machine.set('receiving', 'loaded')
          return
        }
        default:
          throw new MigrationDecodeError(`unexpected '${m.type}' from the source`)
      }
    }
  }

  /**
   * Post-copy: the pager takes the guest's first touch of every owed chunk (they are punched out of the
   * RAM file), and the receiver asks the source for them and places what arrives. From here on, before
   * the device state is even loaded (loading it may touch owed chunks).
   */
  private async startPaging(vm: Vm, bitmap: Uint8Array): Promise<void> {
    const { prepare, signal } = this.init
    if (vm.pid === undefined) throw new PostcopyError(`VM '${this.name}' has no process to page for`)
    const count = prepare.ramSize / prepare.chunkSize
    this.pager = await startPager({
      pid: vm.pid,
      ramPath: vm.memory.path,
      ramBytes: prepare.ramSize,
      chunkBytes: prepare.chunkSize,
      ...(signal === undefined ? {} : { signal }),
    })
    const { count: owed } = await this.pager.owe(bitmap)
    this.receiver = new PostcopyReceiver(this.pager, bitmapChunks(bitmap, count), prepare.chunkSize, count)
    this.receiver.attach(this.init.conv)
    // Persisted before the guest may run: an agent killed during post-copy takes the pager back.
    await this.init.host.beginPostcopy?.({
      vm: this.name,
      token: prepare.token,
      from: this.init.conv.channel.peer,
      pid: vm.pid,
      ramPath: vm.memory.path,
      ramSize: prepare.ramSize,
      chunkSize: prepare.chunkSize,
      qemuFd: this.pager.qemuFd,
      owed: Buffer.from(bitmap).toString('base64'),
      at: Date.now(),
    })
    this.init.log.info('post-copy: paging', { vm: this.name, owedBytes: owed * prepare.chunkSize })
  }

  /** postcopy → running: the guest runs here; wait until every owed chunk is placed (runPostcopy). */
  private async awaitPostcopy(): Promise<void> {
    const receiver = this.receiver!
    const { conv, prepare, log, signal } = this.init
    const progress = setInterval(() => this.emit('postcopy'), 500)
    progress.unref()
    try {
      await runPostcopy({
        receiver,
        conv,
        peer: conv.channel.peer,
        vm: this.name,
        token: prepare.token,
        ramSize: prepare.ramSize,
        chunkSize: prepare.chunkSize,
        budgetMs: this.init.postcopyResumeMs ?? 600_000,
        log,
        ...(this.init.network === undefined ? {} : { network: this.init.network }),
        ...(this.init.register === undefined ? {} : { register: this.init.register }),
        ...(signal === undefined ? {} : { signal }),
        onSession: (c, unregister) => this.extra.push({ conv: c, unregister }),
      })
      log.info('post-copy: all memory is here', {
        vm: this.name,
        faults: receiver.stats.faults,
        maxFaultMs: Math.round(receiver.stats.maxFaultMs),
      })
      await this.init.host.endPostcopy?.(this.name)
    } finally {
      clearInterval(progress)
    }
  }

  /**
   * loaded → committed: the source's commit for our token. This host's ownership (token, source, and
   * how to find the incoming QEMU again) is recorded durably before the guest may run: an agent killed
   * from here on finds the record when it restarts, re-adopts the QEMU (resuming it if need be) instead
   * of sweeping it, and never answers `absent` for this token.
   */
  private async awaitCommit(): Promise<void> {
    const { conv, prepare, host, signal } = this.init
    const commit = await conv.next(['commit'], 'commit', this.timeoutMs, signal)
    if (commit.token !== prepare.token) throw new StaleTokenError(this.name, commit.token, prepare.token)
    this.machine.set('loaded', 'committed')
    await host.ledger.commitIncoming({
      vm: this.name,
      token: prepare.token,
      from: conv.channel.peer,
      at: Date.now(),
      handle: host.handle(this.vm!),
    })
    faultPoint('destination:recorded', this.name)
  }

  /** committed → resumed → running: the guest runs here; the host adopts it. */
  private async resume(): Promise<DestinationOutcome> {
    const { conv, prepare, host, log } = this.init
    const vm = this.vm!
    await vm.resume()
    this.machine.set('committed', 'resumed')
    // Post-copy: from this very moment the source must keep its copy (a query answers 'postcopy').
    if (this.receiver !== undefined) this.machine.set('resumed', 'postcopy')
    const resumedAt = Date.now()
    // The commit record already says the guest is ours: tell the source at once (its pause ends when
    // it hears this), then adopt and file the token.
    conv.trySend({ type: 'resumed', sid: this.sid, token: prepare.token, resumedAt })
    await host.adopt(vm)
    await host.setToken(this.name, prepare.token)
    await host.ledger.endIncoming(this.name)
    await this.init.cache?.forget(this.name).catch(() => {})
    for (const s of this.streams) s.close()
    this.emit('resumed', true)
    if (this.receiver !== undefined) {
      await this.awaitPostcopy()
      this.machine.set('postcopy', 'running')
    } else this.machine.set('resumed', 'running')
    log.info('VM resumed here', { vm: this.name, fence: prepare.token, from: conv.channel.peer })
    return 'running'
  }

  /** What a failure means here: before the resume, discard everything; after it, the guest runs. */
  private async fail(err: unknown): Promise<DestinationOutcome> {
    const { conv, host, log } = this.init
    if (this.machine.is('refused')) throw err
    if (this.machine.is('postcopy')) {
      if (err instanceof AbortError) {
        // The agent stops: the guest runs on here. Its pager goes, QEMU's own copy of the userfaultfd
        // stays: what is still owed blocks the guest (never zeros) until an agent takes it back.
        log.warn('post-copy interrupted: the guest waits for the rest of its memory', {
          vm: this.name,
          owedBytes: (this.receiver?.remaining ?? 0) * this.init.prepare.chunkSize,
        })
        await this.pager?.quit()
        return 'running'
      }
      // The memory it lacks cannot come any more: running on would mean running on holes.
      this.machine.set('postcopy', 'lost')
      const owed = (this.receiver?.remaining ?? 0) * this.init.prepare.chunkSize
      log.error('post-copy failed: the VM lost memory and is stopped here', {
        vm: this.name,
        owedBytes: owed,
        error: describeError(err),
      })
      conv.trySend({
        type: 'abort',
        sid: this.sid,
        code: 'E_MIGRATION_LOST',
        reason: `VM '${this.name}' was lost on the destination: ${describeError(err)}`,
      })
      await this.pager?.quit()
      await this.vm?.stop().catch(() => {})
      await host.release(this.name).catch(() => {})
      await host.endPostcopy?.(this.name).catch(() => {})
      // The ledger says so (queries answer 'lost'; the source keeps its older copy paused for an operator).
      await host.ledger
        .markLost(
          { vm: this.name, token: this.init.prepare.token, on: '', at: Date.now() },
          describeError(err),
        )
        .catch(() => {})
      throw new MigrationLostError(
        `VM '${this.name}' was lost: ${(owed / (1024 * 1024)).toFixed(1)} MiB of its memory never arrived from ${conv.channel.peer} (${describeError(err)}); it was stopped here rather than run on missing memory`,
        { cause: err },
      )
    }
    if (this.machine.is('resumed', 'running')) {
      // Already running here under the new token: never discard a running guest.
      log.error('after resume', { vm: this.name, error: describeError(err) })
      if (this.machine.is('resumed')) this.machine.set('resumed', 'running')
      return 'running'
    }
    const committed = this.machine.is('committed')
    this.machine.to('discarding')
    if (!(err instanceof AbortError) && !(err instanceof MigrationError && conv.failed === err))
      conv.trySend({
        type: 'abort',
        sid: this.sid,
        code: (err as { code?: string }).code ?? 'E_MIGRATION',
        reason: describeError(err),
      })
    log.warn('incoming migration failed; discarding', { vm: this.name, error: describeError(err) })
    this.startAbort.abort(err)
    for (const s of this.streams) s.close()
    if (this.pager !== undefined) {
      await this.pager.quit()
      await host.endPostcopy?.(this.name).catch(() => {})
    }
    if (this.vm === undefined && this.vmStart !== undefined)
      this.vm = await this.vmStart.catch(() => undefined)
    // A disk seeded from the one the VM left here holds that disk (and some of this attempt's chunks):
    // kept as the previous disk, without a record, so a retry fills from it by hash instead of
    // taking everything from the source (the driver does the same if the VM never started).
    if (this.vm?.volumeSeed !== undefined) this.vm.retainVolumeOnStop?.()
    if (this.vm !== undefined) await this.vm.stop().catch(() => {})
    if (this.ramPath !== undefined) await host.discardRam(this.ramPath).catch(() => {})
    if (committed && host.ledger.incoming().some((r) => r.vm === this.name)) {
      // Committed, and the resume failed: whether the guest ran a moment is unknown, so this token's
      // copy counts as lost (the source then keeps its older copy paused for an operator's decision).
      await host.ledger.endIncoming(this.name).catch(() => {})
      await host.ledger
        .markLost(
          { vm: this.name, token: this.init.prepare.token, on: '', at: Date.now() },
          describeError(err),
        )
        .catch(() => {})
    }
    this.machine.set('discarding', 'discarded')
    throw err
  }
}
