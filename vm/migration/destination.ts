/**
 * The destination of a live migration: one session per incoming move, its progress in one state field
 * (state.ts: DESTINATION_TRANSITIONS). Each stream's messages go to its DestinationStream (RAM:
 * ram-receiver.ts); the device state (reference copy and final delta) is handled here because the VM
 * loads it once, at 'final'. The guest resumes only on the source's commit.
 */
import { AbortError, describeError } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import { DiskReceiver } from '../disk/receiver.ts'
import { checkBaseHere } from '../disk/volume.ts'
import type { Vm } from '../driver/interfaces.ts'
import type { Conversation } from './conversation.ts'
import { MigrationDecodeError, MigrationError, MigrationRefusedError, StaleTokenError } from './errors.ts'
import { faultPoint } from './fault-points.ts'
import type { MigrationProgress, RamCache, VmHost } from './interfaces.ts'
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
    })
  }

  async run(): Promise<DestinationOutcome> {
    const { signal } = this.init
    const onAbort = () => this.startAbort.abort(signal?.reason)
    signal?.addEventListener('abort', onAbort, { once: true })
    try {
      this.check()
      await this.prepare()
      await this.receive()
      await this.awaitCommit()
      return await this.resume()
    } catch (err) {
      return await this.fail(err)
    } finally {
      signal?.removeEventListener('abort', onAbort)
      for (const s of this.streams) s.close()
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
      this.streams.push(new DiskReceiver(() => this.vmStart, this.init.cache, log))
    // Start the incoming VM now: it boots (and waits) while the RAM arrives, off the downtime.
    this.vmStart = host.startIncoming(spec, this.ramPath, this.startAbort.signal)
    this.vmStart.catch(() => {}) // observed at 'final'
    await conv.send({ type: 'accept', sid: this.sid, cachedChunks: 0 }, signal)
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
    const types: MessageType[] = [...byType.keys(), 'round', 'state', 'stateref', 'zstate', 'final', 'ping']
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
        case 'final': {
          if (m.token !== prepare.token) throw new StaleTokenError(this.name, m.token, prepare.token)
          if (zstate === undefined && (!state.complete || state.total <= 0))
            throw new MigrationDecodeError('final before the whole device state')
          this.emit('switch', true)
          faultPoint('destination:final', this.name)
          this.vm = await this.vmStart!
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
    this.machine.set('resumed', 'running')
    log.info('VM resumed here', { vm: this.name, fence: prepare.token, from: conv.channel.peer })
    return 'running'
  }

  /** What a failure means here: before the resume, discard everything; after it, the guest runs. */
  private async fail(err: unknown): Promise<DestinationOutcome> {
    const { conv, host, log } = this.init
    if (this.machine.is('refused')) throw err
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
    if (this.vm === undefined && this.vmStart !== undefined)
      this.vm = await this.vmStart.catch(() => undefined)
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
