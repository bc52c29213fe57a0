import { setTimeout as sleep } from 'node:timers/promises'
import type { Vm } from '../../../vm/driver/interfaces.ts'
import { Conversation } from '../../../vm/migration/conversation.ts'
import { type DestinationOutcome, migrateIn } from '../../../vm/migration/destination.ts'
import {
  MigrationError,
  MigrationInDoubtError,
  MigrationLinkError,
  MigrationLostError,
  MigrationRefusedError,
  MigrationTargetError,
  MigrationTimeoutError,
} from '../../../vm/migration/errors.ts'
import type {
  MigrationChannel,
  MigrationNetwork,
  MigrationProgress,
  MigrationReport,
  PostcopyRecord,
  RamCache,
  SwitchRecord,
  VmHost,
} from '../../../vm/migration/interfaces.ts'
import { PostcopyReceiver, runPostcopy } from '../../../vm/migration/postcopy-dest.ts'
import { bitmapChunks, PostcopyLender } from '../../../vm/migration/postcopy-source.ts'
import { lostMessage, settleSwitch } from '../../../vm/migration/settle.ts'
import { type MigrationTuning, migrateOut } from '../../../vm/migration/source.ts'
import type { DestinationState, SourceState } from '../../../vm/migration/state.ts'
import {
  decodeMessage,
  decodeMoveOptions,
  type HistoryEvent,
  MAX_HISTORY_EVENTS,
  type Message,
  type MoveOptions,
  newSessionId,
  type QueryState,
} from '../../../vm/migration/v1/messages.ts'
import { whereabouts } from '../../../vm/migration/whereabouts.ts'
import { type Pager, startPager } from '../../../vm/postcopy/pager.ts'
import type { ThrottleProvider } from '../../../vm/throttle/interfaces.ts'
import { linkedController, onAbort } from '../../base/abort.ts'
import { AbortError, describeError, MeshError, UsageError } from '../../base/errors.ts'
import type { Logger } from '../../base/log.ts'
import { processAlive } from '../../base/process.ts'
import type { ControlHandlers } from '../../control/api.ts'
import type { HandlerContext } from '../../control/server.ts'

export interface MigrationServiceInit {
  network: MigrationNetwork
  host: VmHost
  cache?: RamCache
  log: Logger
  /** Membership check: only members may send a VM here or ask for a move. */
  isMember(peer: string): boolean
  tuning?: MigrationTuning
  /** Turns a member name or PeerId prefix into a PeerId (the net service's resolver); default: exact
   *  PeerId or a unique prefix among the linked peers. */
  resolvePeer?: (ref: string) => string
  /** How long to wait for members to say where a VM runs (default 3 s). */
  locateTimeoutMs?: number
  /** The member that runs a VM when no linked member says it does (the agent's VM directory, which also
   *  asks the members this host keeps no link to: large meshes link a warm set only); the request then
   *  goes over a link built on demand (network.connect). */
  findHost?: (vm: string, signal: AbortSignal) => Promise<string | undefined>
  /** Every state change of every session (see vm/migration/state.ts): metrics, logs, tests. */
  onState?: (e: MigrationStateEvent) => void
  /** Progress of every move out of this host, whoever asked for it (metrics, the web view). */
  onProgress?: (p: MigrationProgress) => void
  /** Every completed move out of this host (metrics, the web view). */
  onReport?: (r: MigrationReport) => void
  /** Slows a guest's vCPUs while pre-copy catches up with it (absent: never throttled). */
  throttle?: ThrottleProvider
  /** Whether this host can receive post-copy moves (vm/postcopy/pager.ts: postcopySupport). */
  postcopy?: () => Promise<boolean>
  /** A member's name for messages and reports (default: its PeerId). */
  nameOf?: (peer: string) => string
  /** How long to wait for each member's answer when gathering token histories (default 3 s). */
  historyTimeoutMs?: number
  /** A move of a VM whose last switch is being settled waits this long for the answer (default 10 s). */
  settleWaitMs?: number
}

/** One member's view of a VM's fencing tokens (`mesh vm tokens`). */
export interface TokenHistoryRow {
  member: string
  peer: string
  /** Newest token this member has seen for the VM (undefined: it did not answer). */
  token?: number
  /** The VM's status there ('' = no copy). */
  status?: string
  lost?: { token: number; on: string }
  events?: HistoryEvent[]
  error?: string
}

/** What `mesh vm recover` did. */
export interface RecoverResult {
  vm: string
  member: string
  token: number
  resumed: boolean
  /** The newer copy given up, when one was recorded as lost. */
  lost?: { token: number; on: string }
}

/** A session's state change, as the service reports it. */
export interface MigrationStateEvent {
  vm: string
  direction: 'out' | 'in'
  /** The other end's PeerId. */
  peer: string
  from: SourceState | DestinationState
  to: SourceState | DestinationState
  atMs: number
}

export interface MigrateParams extends MoveOptions {
  vm: string
  to: string
}

type Handler = (params: unknown, ctx: HandlerContext) => Promise<unknown>

export interface MigrationService {
  readonly name: string
  start(signal: AbortSignal): Promise<void>
  stop(): Promise<void>
  handlers(): Record<string, Handler>
  status(): Record<string, unknown>
  /** Moves a VM wherever it runs (here, or on a member that runs it) to `to`. */
  migrate(
    params: MigrateParams,
    options?: { onProgress?: (p: MigrationProgress) => void; signal?: AbortSignal },
  ): Promise<MigrationReport>
  /** Resolves once RAM chunks kept after moves-out are in the cache (tests, benchmarks). */
  settled(): Promise<void>
  /** Every member's token history of a VM (this one first). */
  tokens(vm: string, signal?: AbortSignal): Promise<TokenHistoryRow[]>
  /**
   * Resumes the copy of a VM held here (paused after a loss or an unsettled switch) under a token newer
   * than any reachable member has seen: the operator's explicit decision to give up a newer copy that
   * is lost (or unreachable). Requires acceptLoss.
   */
  recover(vm: string, options: { acceptLoss: boolean; signal?: AbortSignal }): Promise<RecoverResult>
}

/** The `vm` param of the control API's vm.tokens / vm.recover. */
function vmParam(params: unknown): string {
  const vm = (params as { vm?: unknown } | null)?.vm
  if (typeof vm !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(vm))
    throw new UsageError('vm must be a VM name')
  return vm
}

/** Checks and normalises the control API's `migrate` params. */
export function parseMigrateParams(params: unknown): MigrateParams {
  if (typeof params !== 'object' || params === null) throw new UsageError('migrate: params must be an object')
  const p = params as Record<string, unknown>
  if (typeof p.vm !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(p.vm))
    throw new UsageError('migrate: vm must be a VM name')
  if (typeof p.to !== 'string' || p.to.length === 0 || p.to.length > 256)
    throw new UsageError('migrate: to must be a member name or PeerId')
  if (p.deadlineMs !== undefined && p.deadlineMs !== null) {
    if (typeof p.deadlineMs !== 'number' || !Number.isInteger(p.deadlineMs) || p.deadlineMs < 1000)
      throw new UsageError('migrate: deadlineMs must be an integer of at least 1000')
  }
  if (p.maxPauseMs !== undefined && p.maxPauseMs !== null) {
    if (typeof p.maxPauseMs !== 'number' || !Number.isInteger(p.maxPauseMs) || p.maxPauseMs < 1)
      throw new UsageError('migrate: maxPauseMs must be a positive integer')
  }
  const options: Record<string, unknown> = {}
  for (const k of ['deadlineMs', 'maxPauseMs', 'bestEffort', 'mode'])
    if (p[k] !== undefined && p[k] !== null) options[k] = p[k]
  try {
    return { vm: p.vm, to: p.to, ...decodeMoveOptions(options) }
  } catch (err) {
    throw new UsageError(`migrate: ${describeError(err)}`, { cause: err })
  }
}

/** The move options of params, as migrateOut() and a 'request' take them. */
function moveOptions(p: MoveOptions): MoveOptions {
  const out: MoveOptions = {}
  if (p.deadlineMs !== undefined) out.deadlineMs = p.deadlineMs
  if (p.maxPauseMs !== undefined) out.maxPauseMs = p.maxPauseMs
  if (p.bestEffort !== undefined) out.bestEffort = p.bestEffort
  if (p.mode !== undefined) out.mode = p.mode
  return out
}

/**
 * The migration service of one host: answers the 'migrate' control method, receives VMs sent here,
 * runs moves that other members request for VMs of this host, and answers 'locate' and 'query'.
 * Everything travels on the link's 'migrate' channel (see v1/messages.ts).
 */
export function createMigrationService(init: MigrationServiceInit): MigrationService {
  const { network, host, log } = init
  const sessions = new Map<string, Conversation>()
  /** Outcome of recent incoming sessions by VM and token, for the source's 'query'. */
  const outcomes = new Map<string, DestinationOutcome | 'pending' | 'postcopy' | 'lost'>()
  /** Moves out in post-copy whose link broke: waiting for the destination's 'pcresume', by vm#token. */
  const resumeWaiters = new Map<string, (x: { conv: Conversation; bitmap: Uint8Array }) => void>()
  /** A destination came back (pcresume) before its source session noticed the link broke, by vm#token. */
  const pendingResumes = new Map<string, { conv: Conversation; bitmap: Uint8Array }>()
  /** Post-copy lending a finished session left (the destination came back after it gave up), by VM. */
  const lending = new Set<string>()
  const busy = new Set<string>()
  /** The state of each session running now, by VM name ('out:precopy', 'in:receiving'...). */
  const states = new Map<string, string>()
  const stateOf =
    (vm: string, direction: 'out' | 'in', peer: string, onChange?: (to: string) => void) =>
    (t: { from: SourceState | DestinationState; to: SourceState | DestinationState; atMs: number }) => {
      states.set(vm, `${direction}:${t.to}`)
      onChange?.(t.to)
      init.onState?.({ vm, direction, peer, from: t.from, to: t.to, atMs: t.atMs })
    }
  const nameOf = (peer: string): string => {
    if (peer === '' || peer === network.self) return selfName()
    try {
      return init.nameOf?.(peer) ?? peer
    } catch {
      return peer
    }
  }
  const selfName = () => {
    try {
      return init.nameOf?.(network.self) ?? network.self
    } catch {
      return network.self
    }
  }
  /** VMs whose last move out is in doubt (paused here until the destination answers), by name. */
  const settling = new Map<
    string,
    { record: SwitchRecord; ac: AbortController; wake: AbortController; done: Promise<unknown> }
  >()
  const background = new Set<Promise<unknown>>()
  const unsubs: Array<() => void> = []
  let ac = new AbortController()
  let running = false
  let counters = { in: 0, out: 0, refused: 0, failed: 0 }

  const register = (sid: string, conv: Conversation) => {
    sessions.set(sid, conv)
    return () => {
      if (sessions.get(sid) === conv) sessions.delete(sid)
    }
  }
  const track = <T>(p: Promise<T>): Promise<T> => {
    background.add(p)
    void p.finally(() => background.delete(p)).catch(() => {})
    return p
  }
  const resolvePeer = (to: string): string => {
    if (init.resolvePeer !== undefined) return init.resolvePeer(to)
    const peers = network.channels().map((c) => c.peer)
    if (peers.includes(to)) return to
    const matches = peers.filter((p) => p.startsWith(to))
    if (matches.length === 1) return matches[0]!
    if (matches.length > 1) throw new UsageError(`'${to}' matches several members: ${matches.join(', ')}`)
    throw new MigrationTargetError(`no link to a member '${to}' (see 'mesh peers')`)
  }

  const attach = (ch: MigrationChannel) => {
    const off = ch.onMessage((bytes) => {
      let m: Message
      try {
        m = decodeMessage(bytes)
      } catch (err) {
        log.warn('dropping a bad migration message', { peer: ch.peer, error: describeError(err) })
        return
      }
      const conv = sessions.get(m.sid)
      if (conv !== undefined && conv.channel.peer === ch.peer) {
        conv.deliver(m, bytes.byteLength)
        return
      }
      onNewMessage(ch, m, bytes.byteLength)
    })
    const offClose = ch.onClose(() => {
      off()
      offClose()
    })
  }

  /**
   * Settles a switch in the background until the destination answers (see settle.ts). Meanwhile the VM
   * is neither moved again nor reported as here: its copy is paused and may not be ours any more.
   */
  const settle = (record: SwitchRecord) => {
    if (settling.has(record.vm)) return
    const own = new AbortController()
    const entry = {
      record,
      ac: own,
      wake: new AbortController(),
      done: Promise.resolve() as Promise<unknown>,
    }
    settling.set(record.vm, entry)
    log.warn('settling an unfinished switch with the destination', {
      vm: record.vm,
      to: nameOf(record.to),
      fence: record.token,
    })
    entry.done = track(
      settleSwitch({
        network,
        register,
        host,
        log,
        record,
        signal: AbortSignal.any([ac.signal, own.signal]),
        wake: () => entry.wake.signal,
      })
        .then(
          (outcome) =>
            (outcome === 'lost' ? log.error : log.info)('switch settled', {
              vm: record.vm,
              to: nameOf(record.to),
              outcome,
              ...(outcome === 'lost'
                ? { next: lostMessage(record.vm, record.token, nameOf(record.to), selfName()) }
                : {}),
            }),
          (err: unknown) => {
            if (!(err instanceof AbortError))
              log.error('settling a switch failed', { vm: record.vm, error: describeError(err) })
          },
        )
        .finally(() => settling.delete(record.vm)),
    )
  }

  /**
   * What this host says about `vm` under `token` to a source that does not know whether its move
   * completed. Never 'absent' for a token this host committed to: the ledger records the commit before
   * the guest resumes, so a copy that ran here and died is 'lost', one that moved on is 'running'.
   */
  const answerQuery = (vm: string, token: number): QueryState => {
    const outcome = outcomes.get(`${vm}#${token}`)
    // It runs here but still lacks memory the source holds: the source must keep its copy (#15).
    if (outcome === 'postcopy' && host.ledger.lost(vm) === undefined) return 'postcopy'
    if (outcome === 'running') return 'running'
    if (host.get(vm) !== undefined && host.token(vm) >= token && host.ledger.lost(vm) === undefined)
      return 'running'
    if (outcome === 'pending') return 'pending'
    if (host.token(vm) >= token) {
      // Committed here and re-adopted after a restart (or not yet): wait for the restore.
      if (host.ledger.incoming().some((r) => r.vm === vm && r.token >= token)) return 'pending'
      // It ran here and moved on since: the asker's copy is stale either way.
      if (host.ledger.history(vm).some((e) => e.event === 'out' && e.token > token)) return 'running'
      return 'lost'
    }
    return outcome ?? 'absent'
  }

  const localHistory = (vm: string) => {
    const lost = host.ledger.lost(vm)
    return {
      vm,
      token: host.token(vm),
      status: host.get(vm)?.status() ?? '',
      ...(lost === undefined
        ? {}
        : { lost: { token: lost.token, on: lost.on === '' ? network.self : lost.on } }),
      events: host.ledger
        .history(vm)
        .slice(-MAX_HISTORY_EVENTS)
        .map((e) => ({ ...e, ...(e.peer === '' ? { peer: network.self } : {}) })),
    }
  }

  /**
   * After an agent restart: every move this host committed to whose VM the manager does not hold yet
   * (the agent died between the commit record and the adoption). A QEMU that still lives is re-adopted
   * and resumed if the killed agent had not resumed it yet (the source sent the commit: it will never
   * resume its copy on its own); one that died is recorded as lost. Idempotent.
   */
  const restoreIncoming = async (): Promise<void> => {
    for (const r of host.ledger.incoming()) {
      if (host.get(r.vm) !== undefined) {
        await host.setToken(r.vm, r.token)
        await host.ledger.endIncoming(r.vm)
        continue
      }
      let vm: Vm
      try {
        vm = await host.reattach(r.handle, ac.signal)
      } catch (err) {
        if (err instanceof AbortError) throw err
        log.error('a VM committed here died while the agent was down: recorded as lost', {
          vm: r.vm,
          fence: r.token,
          from: nameOf(r.from),
          error: describeError(err),
        })
        await host.ledger.markLost(
          { vm: r.vm, token: r.token, on: '', at: Date.now() },
          'its QEMU died while the agent was down',
        )
        await host.ledger.endIncoming(r.vm)
        continue
      }
      await host.adopt(vm)
      const wasPaused = vm.status() === 'paused'
      if (wasPaused) await vm.resume(ac.signal)
      await host.setToken(r.vm, r.token)
      await host.ledger.record(r.vm, {
        token: r.token,
        event: 'restored',
        peer: r.from,
        note: wasPaused ? 'resumed after restart' : 'was running',
      })
      await host.ledger.endIncoming(r.vm)
      log.warn('re-adopted a VM committed here before the agent restarted', {
        vm: r.vm,
        fence: r.token,
        from: nameOf(r.from),
        resumed: wasPaused,
      })
    }
  }

  const refuse = (ch: MigrationChannel, sid: string, code: string, reason: string) => {
    const conv = new Conversation(ch, sid)
    conv.trySend({ type: 'refuse', sid, code, reason })
    conv.close()
  }

  const onNewMessage = (ch: MigrationChannel, m: Message, size: number) => {
    if (!running) return
    const member = init.isMember(ch.peer)
    switch (m.type) {
      case 'prepare': {
        if (!member) {
          counters.refused++
          log.warn('refused a migration from a non-member', { peer: ch.peer, vm: m.spec.name })
          refuse(ch, m.sid, 'E_NOT_MEMBER', 'not a member of this network')
          return
        }
        const name = m.spec.name
        if (busy.has(name)) {
          refuse(ch, m.sid, 'E_BUSY', `VM '${name}' is already migrating`)
          return
        }
        const conv = new Conversation(ch, m.sid, nameOf(ch.peer))
        conv.receivedBytes += size
        const unregister = register(m.sid, conv)
        busy.add(name)
        const key = `${name}#${m.token}`
        outcomes.set(key, 'pending')
        counters.in++
        void track(
          migrateIn({
            conv,
            prepare: m,
            host,
            log,
            signal: ac.signal,
            nameOf,
            selfName: selfName(),
            onState: stateOf(name, 'in', ch.peer, (to) => {
              // From the resume on the source must hear 'running', even before the session ends; while
              // the guest still pages (post-copy), 'postcopy': the source must keep its copy.
              if (to === 'resumed' || to === 'running') outcomes.set(key, 'running')
              if (to === 'postcopy') outcomes.set(key, 'postcopy')
            }),
            network,
            register,
            ...(init.postcopy === undefined ? {} : { postcopy: init.postcopy }),
            ...(init.cache ? { cache: init.cache } : {}),
          })
            .then(
              (o) => outcomes.set(key, o),
              (err: unknown) => {
                counters.failed++
                outcomes.set(key, err instanceof MigrationLostError ? 'lost' : 'discarded')
                if (!(err instanceof MigrationError) && !(err instanceof AbortError))
                  log.error('incoming migration failed', { vm: name, error: describeError(err) })
              },
            )
            .finally(() => {
              busy.delete(name)
              states.delete(name)
              unregister()
              conv.close()
              // Bounded memory: forget the oldest outcomes.
              while (outcomes.size > 1000) outcomes.delete(outcomes.keys().next().value!)
            }),
        )
        return
      }
      case 'pcresume': {
        // A destination comes back for the rest of a post-copy (link cut, or an agent restart).
        if (!member) return
        const conv = new Conversation(ch, m.sid)
        conv.receivedBytes += size
        const unregister = register(m.sid, conv)
        void track(
          conv
            .next(['owed'], 'owed (pcresume)', 30_000, ac.signal)
            .then((owed) => {
              const key = `${m.vm}#${m.token}`
              const waiter = resumeWaiters.get(key)
              void conv.whenFailed().then(unregister)
              if (waiter !== undefined) {
                // The session that switched is waiting: it takes over this conversation.
                resumeWaiters.delete(key)
                conv.trySend({ type: 'accept', sid: conv.sid, cachedChunks: 0, postcopy: true })
                waiter({ conv, bitmap: owed.bitmap })
                return
              }
              if (states.get(m.vm) === 'out:postcopy') {
                // The session has not noticed its link broke yet: it takes this one when it does.
                pendingResumes.get(key)?.conv.close()
                pendingResumes.set(key, { conv, bitmap: owed.bitmap })
                return
              }
              return lendAgain(m.vm, m.token, ch.peer, conv, owed.bitmap).finally(() => {
                unregister()
                conv.close()
              })
            })
            .catch((err: unknown) => {
              unregister()
              conv.close()
              if (!(err instanceof AbortError))
                log.warn('post-copy resume failed', { vm: m.vm, peer: ch.peer, error: describeError(err) })
            }),
        )
        return
      }
      case 'query': {
        if (!member) return
        const conv = new Conversation(ch, m.sid)
        conv.trySend({
          type: 'query-reply',
          sid: m.sid,
          vm: m.vm,
          state: answerQuery(m.vm, m.token),
          token: host.token(m.vm),
        })
        conv.close()
        return
      }
      case 'history': {
        if (!member) return
        const conv = new Conversation(ch, m.sid)
        conv.trySend({ type: 'history-reply', sid: m.sid, ...localHistory(m.vm) })
        conv.close()
        return
      }
      case 'locate': {
        if (!member) return
        const here = host.get(m.vm) !== undefined && !settling.has(m.vm)
        const conv = new Conversation(ch, m.sid)
        conv.trySend({ type: 'locate-reply', sid: m.sid, vm: m.vm, here, token: host.token(m.vm) })
        conv.close()
        return
      }
      case 'ping': {
        const conv = new Conversation(ch, m.sid)
        conv.trySend({ type: 'pong', sid: m.sid, t0: m.t0, t1: Date.now() })
        conv.close()
        return
      }
      case 'request': {
        const conv = new Conversation(ch, m.sid)
        if (!member) {
          counters.refused++
          log.warn('refused a migrate request from a non-member', { peer: ch.peer, vm: m.vm })
          conv.trySend({
            type: 'request-result',
            sid: m.sid,
            ok: false,
            error: { code: 'E_NOT_MEMBER', message: 'migration refused: not a member of this network' },
          })
          conv.close()
          return
        }
        const params: MigrateParams = { vm: m.vm, to: m.to, ...moveOptions(m) }
        void track(
          runLocal(params, {
            onProgress: (p) => conv.trySend({ type: 'request-event', sid: m.sid, event: { ...p } }),
            signal: ac.signal,
          })
            .then(
              (report) =>
                conv.trySend({ type: 'request-result', sid: m.sid, ok: true, report: { ...report } }),
              (err: unknown) =>
                conv.trySend({
                  type: 'request-result',
                  sid: m.sid,
                  ok: false,
                  error: {
                    code: (err as { code?: string }).code ?? 'E_MIGRATION',
                    message: describeError(err),
                  },
                }),
            )
            .finally(() => conv.close()),
        )
        return
      }
      default:
        // A message for a session that has ended (late data after an abort): nothing to do.
        return
    }
  }

  /**
   * Post-copy whose session ended (its link broke for too long, or this agent restarted): the
   * destination came back with what it still lacks. Lend it from our paused copy, then let the copy go.
   */
  const lendAgain = async (
    name: string,
    token: number,
    peer: string,
    conv: Conversation,
    bitmap: Uint8Array,
  ): Promise<void> => {
    const record = host.switches?.().find((r) => r.vm === name && r.token === token && r.to === peer)
    const vm = host.get(name)
    if (record?.mode !== 'postcopy' || vm === undefined || vm.status() !== 'paused') {
      conv.trySend({
        type: 'abort',
        sid: conv.sid,
        code: 'E_POSTCOPY_SOURCE_GONE',
        reason: `no paused copy of '${name}' under token ${token} here`,
      })
      return
    }
    if (lending.has(name)) return
    lending.add(name)
    conv.trySend({ type: 'accept', sid: conv.sid, cachedChunks: 0, postcopy: true })
    try {
      const chunkSize = init.tuning?.chunkSize ?? 64 * 1024
      const lender = new PostcopyLender({
        ramPath: vm.memory.path,
        ramSize: vm.memory.size,
        chunkSize,
        order: bitmapChunks(bitmap, vm.memory.size / chunkSize),
        windowBytes: 1024 * 1024,
        log,
        signal: ac.signal,
      })
      try {
        log.info('post-copy: lending the rest of a VM again', {
          vm: name,
          to: peer,
          chunks: lender.remaining,
        })
        lender.attach(conv)
        lender.startBackground()
        await lender.pump()
        await lender.finished(120_000)
      } finally {
        lender.close()
      }
      // Every owed chunk is placed there: our copy is no longer needed.
      await host.setToken(name, token)
      await vm.stop()
      await host.release(name)
      await host.endSwitch?.(name)
      log.info('post-copy finished after a break: the copy here is gone', { vm: name, to: peer })
    } finally {
      lending.delete(name)
    }
  }

  /**
   * A post-copy this host was receiving when its agent died (the record outlived it): take the pager
   * back from the incoming QEMU (its uffd stayed registered: the guest waited, never read zeros) and
   * fetch what is still owed from the source. If the QEMU is gone or the source cannot send the rest,
   * the VM is lost: stopped, reported.
   */
  const resumePaging = async (rec: PostcopyRecord): Promise<void> => {
    const key = `${rec.vm}#${rec.token}`
    busy.add(rec.vm)
    outcomes.set(key, 'postcopy')
    const opened: { conv: Conversation; unregister: () => void }[] = []
    let pager: Pager | undefined
    try {
      log.warn('taking up an unfinished post-copy', { vm: rec.vm, from: rec.from, token: rec.token })
      if (!processAlive(rec.pid))
        throw new MigrationLostError(`the incoming QEMU of VM '${rec.vm}' (pid ${rec.pid}) is gone`)
      pager = await startPager({
        pid: rec.pid,
        ramPath: rec.ramPath,
        ramBytes: rec.ramSize,
        chunkBytes: rec.chunkSize,
        regrabFd: rec.qemuFd,
        signal: ac.signal,
      })
      const count = rec.ramSize / rec.chunkSize
      const now = await pager.owe(Buffer.from(rec.owed, 'base64'))
      const receiver = new PostcopyReceiver(pager, bitmapChunks(now.bitmap, count), rec.chunkSize, count)
      try {
        await runPostcopy({
          receiver,
          conv: undefined,
          peer: rec.from,
          vm: rec.vm,
          token: rec.token,
          ramSize: rec.ramSize,
          chunkSize: rec.chunkSize,
          network,
          register,
          budgetMs: 600_000,
          log,
          signal: ac.signal,
          onSession: (conv, unregister) => opened.push({ conv, unregister }),
        })
      } finally {
        receiver.close()
      }
      outcomes.set(key, 'running')
      await host.endPostcopy?.(rec.vm)
      // Its QMP may not have answered at start (a thread waited on memory): take control of it now.
      if (host.get(rec.vm) === undefined && host.readopt !== undefined) {
        try {
          await host.readopt(rec.vm)
        } catch (err) {
          log.error('cannot take control of the VM after post-copy', {
            vm: rec.vm,
            error: describeError(err),
          })
        }
      }
      log.info('post-copy finished after a restart: all memory is here', { vm: rec.vm })
    } catch (err) {
      if (err instanceof AbortError) {
        await pager?.quit()
        return
      }
      outcomes.set(key, 'lost')
      log.error('post-copy could not be finished: the VM is lost and stopped here', {
        vm: rec.vm,
        error: describeError(err),
      })
      await pager?.quit()
      await host
        .get(rec.vm)
        ?.stop()
        .catch(() => {})
      if (host.get(rec.vm) === undefined && processAlive(rec.pid)) {
        // Not adopted (its QMP did not answer while it waited): end the process itself.
        try {
          process.kill(rec.pid, 'SIGKILL')
        } catch {
          // gone
        }
      }
      await host.release(rec.vm).catch(() => {})
      await host.endPostcopy?.(rec.vm)
    } finally {
      busy.delete(rec.vm)
      for (const o of opened) {
        o.unregister()
        o.conv.close()
      }
    }
  }

  const awaitPostcopyResume = (vm: string, token: number, signal?: AbortSignal) =>
    new Promise<{ conv: Conversation; bitmap: Uint8Array }>((resolve, reject) => {
      const key = `${vm}#${token}`
      const early = pendingResumes.get(key)
      if (early !== undefined && early.conv.failed === undefined) {
        pendingResumes.delete(key)
        early.conv.trySend({ type: 'accept', sid: early.conv.sid, cachedChunks: 0, postcopy: true })
        resolve(early)
        return
      }
      const offAbort = onAbort(signal, () => {
        resumeWaiters.delete(key)
        reject(new AbortError())
      })
      resumeWaiters.set(key, (x) => {
        offAbort()
        resolve(x)
      })
    })

  const runLocal = async (
    params: MigrateParams,
    options: { onProgress?: (p: MigrationProgress) => void; signal?: AbortSignal },
  ): Promise<MigrationReport> => {
    const vm = host.get(params.vm)
    if (vm === undefined) throw new MigrationTargetError(`VM '${params.vm}' does not run here`)
    const pending = settling.get(params.vm)
    if (pending !== undefined) {
      // Its last switch is still being settled (e.g. the agent just restarted): ask again now, and give
      // the answer a moment before refusing.
      const w = pending.wake
      pending.wake = new AbortController()
      w.abort()
      await Promise.race([
        pending.done,
        sleep(init.settleWaitMs ?? 10_000, undefined, { signal: ac.signal }).catch(() => {}),
      ])
    }
    const doubt = settling.get(params.vm)?.record
    if (doubt !== undefined)
      throw new MigrationRefusedError(
        `VM '${params.vm}' is ${host.get(params.vm)?.status() ?? 'held'} here until ${nameOf(doubt.to)} says whether it resumed the last move (token ${doubt.token}); if ${nameOf(doubt.to)} is gone for good: mesh vm recover ${params.vm} --accept-loss`,
        { code: 'E_MIGRATION_IN_DOUBT' },
      )
    const lost = host.ledger.lost(params.vm)
    if (lost !== undefined)
      throw new MigrationRefusedError(lostMessage(params.vm, lost.token, nameOf(lost.on), selfName()), {
        code: 'E_MIGRATION_LOST',
      })
    const to = resolvePeer(params.to)
    if (to === network.self) throw new UsageError(`VM '${params.vm}' already runs on ${nameOf(to)}`)
    if (!init.isMember(to)) throw new MigrationRefusedError(`${nameOf(to)} is not a member`)
    if (busy.has(params.vm)) throw new MigrationRefusedError(`VM '${params.vm}' is already migrating`)
    busy.add(params.vm)
    counters.out++
    const signal = options.signal === undefined ? ac.signal : AbortSignal.any([options.signal, ac.signal])
    try {
      // A destination outside this member's warm set gets its link now (large meshes).
      if (network.channel(to) === undefined) await network.connect?.(to, signal)
      const report = await migrateOut({
        network,
        register,
        host,
        log,
        vm,
        to,
        signal,
        onState: stateOf(params.vm, 'out', to),
        nameOf,
        ...moveOptions(params),
        ...(init.throttle === undefined ? {} : { throttle: init.throttle }),
        awaitPostcopyResume,
        ...(init.cache === undefined ? {} : { cache: init.cache }),
        ...(init.tuning === undefined ? {} : { tuning: init.tuning }),
        ...(options.onProgress === undefined && init.onProgress === undefined
          ? {}
          : {
              onProgress: (p: MigrationProgress) => {
                init.onProgress?.(p)
                options.onProgress?.(p)
              },
            }),
        background: track,
      })
      log.info('VM moved', {
        vm: params.vm,
        to,
        totalMs: Math.round(report.totalMs),
        downtimeMs: Math.round(report.downtimeMs),
        wireBytes: report.wireBytes,
      })
      init.onReport?.(report)
      return report
    } catch (err) {
      counters.failed++
      if (err instanceof MigrationInDoubtError) {
        // The VM stays paused here; keep asking the destination for as long as it takes.
        const record = host.switches().find((r) => r.vm === params.vm)
        if (record !== undefined) settle(record)
      }
      throw err
    } finally {
      busy.delete(params.vm)
      states.delete(params.vm)
    }
  }

  /** The channel to the member the directory names for the VM, linked now if it was not. */
  const locateUnlinked = async (vm: string, signal: AbortSignal): Promise<MigrationChannel | undefined> => {
    if (init.findHost === undefined || network.connect === undefined) return undefined
    let peer: string | undefined
    try {
      peer = await init.findHost(vm, signal)
    } catch (err) {
      if (err instanceof AbortError) throw err
      log.warn('cannot ask the directory where a VM runs', { vm, error: describeError(err) })
      return undefined
    }
    if (peer === undefined || !init.isMember(peer)) return undefined
    await network.connect(peer, signal)
    const ch = network.channel(peer)
    return ch?.open === true ? ch : undefined
  }

  /** Asks every linked member whether it runs the VM; the first 'here' wins (then the directory). */
  const locate = async (vm: string, signal: AbortSignal): Promise<MigrationChannel> => {
    const chans = network.channels().filter((c) => c.open && init.isMember(c.peer))
    const timeoutMs = init.locateTimeoutMs ?? 3000
    const convs = chans.map((ch) => {
      const sid = newSessionId()
      const conv = new Conversation(ch, sid)
      return { conv, unregister: register(sid, conv) }
    })
    try {
      const found = await new Promise<MigrationChannel | undefined>((resolve, reject) => {
        let left = convs.length
        if (left === 0) resolve(undefined)
        for (const { conv } of convs) {
          conv.trySend({ type: 'locate', sid: conv.sid, vm })
          conv.next(['locate-reply'], 'locate-reply', timeoutMs, signal).then(
            (r) => {
              if (r.here) resolve(conv.channel)
              else if (--left === 0) resolve(undefined)
            },
            (err: unknown) => {
              if (err instanceof AbortError) reject(err)
              else if (--left === 0) resolve(undefined)
            },
          )
        }
      })
      if (found !== undefined) return found
      const onDemand = await locateUnlinked(vm, signal)
      if (onDemand === undefined)
        throw new MigrationTargetError(
          `no reachable member runs a VM named '${vm}' (see 'mesh vm ls' on each host)`,
        )
      return onDemand
    } finally {
      for (const { conv, unregister } of convs) {
        unregister()
        conv.close()
      }
    }
  }

  const migrate: MigrationService['migrate'] = async (params, options = {}) => {
    if (!running) throw new MigrationError('the migration service is not running')
    if (host.get(params.vm) !== undefined) return runLocal(params, options)
    const signal = options.signal === undefined ? ac.signal : AbortSignal.any([options.signal, ac.signal])
    const ch = await locate(params.vm, signal)
    // Forward to the host that runs the VM; it streams progress and the result back.
    const sid = newSessionId()
    const conv = new Conversation(ch, sid, nameOf(ch.peer))
    const unregister = register(sid, conv)
    let last: MigrationProgress | undefined
    try {
      const req: Message = { type: 'request', sid, vm: params.vm, to: params.to, ...moveOptions(params) }
      await conv.send(req, signal)
      const idleMs = Math.max(120_000, (params.deadlineMs ?? 0) + 30_000)
      for (;;) {
        const m = await conv.next(
          ['request-event', 'request-result'],
          'the host running the VM',
          idleMs,
          signal,
        )
        if (m.type === 'request-event') {
          last = m.event as unknown as MigrationProgress
          options.onProgress?.(last)
          continue
        }
        if (m.ok && m.report !== undefined) return m.report as unknown as MigrationReport
        const e = m.error ?? { code: 'E_MIGRATION', message: 'the migration failed' }
        throw e.code === 'E_NOT_MEMBER'
          ? new MigrationRefusedError(e.message, { code: e.code })
          : new MeshError(`${nameOf(ch.peer)}: ${e.message}`, { code: e.code })
      }
    } catch (err) {
      if (err instanceof AbortError)
        conv.trySend({ type: 'abort', sid, code: 'E_ABORTED', reason: 'cancelled' })
      if (err instanceof MigrationLinkError || err instanceof MigrationTimeoutError)
        // The host running the move went silent (its agent died, or the link broke): say where the VM
        // was last seen, the one thing the operator needs next.
        throw new MigrationLinkError(
          `lost contact with ${nameOf(ch.peer)}, which runs the move (${err.message}); ${whereabouts(params.vm, last).text}`,
          { cause: err },
        )
      throw err
    } finally {
      unregister()
      conv.close()
    }
  }

  /** Asks every linked member for its history of `vm` (this host's first). */
  const tokens = async (vm: string, signal?: AbortSignal): Promise<TokenHistoryRow[]> => {
    const self: TokenHistoryRow = { member: selfName(), peer: network.self, ...localHistory(vm) }
    const chans = network.channels().filter((c) => c.open && init.isMember(c.peer))
    const timeoutMs = init.historyTimeoutMs ?? 3000
    const rows = await Promise.all(
      chans.map(async (ch): Promise<TokenHistoryRow> => {
        const sid = newSessionId()
        const conv = new Conversation(ch, sid)
        const unregister = register(sid, conv)
        try {
          await conv.send({ type: 'history', sid, vm }, signal)
          const r = await conv.next(['history-reply'], 'history-reply', timeoutMs, signal)
          return {
            member: nameOf(ch.peer),
            peer: ch.peer,
            token: r.token,
            status: r.status,
            ...(r.lost === undefined ? {} : { lost: r.lost }),
            events: r.events,
          }
        } catch (err) {
          if (err instanceof AbortError) throw err
          return { member: nameOf(ch.peer), peer: ch.peer, error: describeError(err) }
        } finally {
          unregister()
          conv.close()
        }
      }),
    )
    return [self, ...rows.sort((a, b) => a.member.localeCompare(b.member))]
  }

  const recover: MigrationService['recover'] = async (name, options) => {
    if (!running) throw new MigrationError('the migration service is not running')
    const vm = host.get(name)
    if (vm === undefined) throw new MigrationTargetError(`no copy of VM '${name}' here (${selfName()})`)
    const lost = host.ledger.lost(name)
    const doubt = settling.get(name)?.record ?? host.switches().find((r) => r.vm === name)
    if (!options.acceptLoss) {
      const what =
        lost !== undefined
          ? `its newer copy ran on ${nameOf(lost.on)} (token ${lost.token}) and is gone`
          : doubt !== undefined
            ? `${nameOf(doubt.to)} has not said whether it resumed the last move (token ${doubt.token}): if it did and is only unreachable, recovering makes two copies run`
            : `this copy may be older than one another member ran`
      throw new UsageError(
        `recovering VM '${name}' resumes the copy on ${selfName()}: ${what}. Add --accept-loss to do it anyway`,
      )
    }
    if (busy.has(name)) throw new MigrationRefusedError(`VM '${name}' is migrating`)
    busy.add(name)
    try {
      // Stop asking the destination: the operator decided.
      settling.get(name)?.ac.abort(new MigrationError('recovered by the operator'))
      settling.delete(name)
      // A token newer than any reachable member has seen: every later move from here is accepted, and a
      // copy under an older token can never move again.
      const rows = await tokens(name, options.signal)
      const highest = Math.max(
        host.token(name),
        lost?.token ?? 0,
        doubt?.token ?? 0,
        ...rows.map((r) => r.token ?? 0),
      )
      const token = highest + 1
      const gaveUp = lost ?? (doubt === undefined ? undefined : { token: doubt.token, on: doubt.to })
      log.error("recovering an older copy by the operator's decision", {
        vm: name,
        fence: token,
        ...(gaveUp === undefined ? {} : { gaveUpToken: gaveUp.token, gaveUpOn: nameOf(gaveUp.on) }),
      })
      await host.setToken(name, token)
      await host.ledger.record(name, {
        token,
        event: 'recovered',
        ...(gaveUp === undefined ? {} : { peer: gaveUp.on, note: `gave up token ${gaveUp.token}` }),
      })
      await host.ledger.clearLost(name)
      await host.endSwitch(name)
      const resumed = vm.status() === 'paused'
      if (resumed) await vm.resume(options.signal)
      const r: RecoverResult = { vm: name, member: selfName(), token, resumed }
      if (gaveUp !== undefined) r.lost = { token: gaveUp.token, on: nameOf(gaveUp.on) }
      return r
    } finally {
      busy.delete(name)
    }
  }

  return {
    name: 'migration',
    async start(signal: AbortSignal) {
      // Follows the agent's lifetime; stop() aborts it, which also drops the listener on `signal`.
      ac = linkedController(signal).controller
      running = true
      counters = { in: 0, out: 0, refused: 0, failed: 0 }
      for (const ch of network.channels()) attach(ch)
      unsubs.push(network.onChannel(attach))
      // Switches a killed agent left behind (its paused QEMU outlived it): settle them now.
      await restoreIncoming()
      for (const record of host.switches()) settle(record)
      // The pager is built on first use (gcc, ~1 s): not while a source waits for our 'accept'.
      void init.postcopy?.().catch(() => false)
      // Post-copies a killed agent was receiving: take them up.
      for (const record of host.postcopies?.() ?? []) void track(resumePaging(record))
    },
    async stop() {
      running = false
      ac.abort(new MigrationError('migration service stopping'))
      for (const u of unsubs.splice(0)) u()
      await Promise.allSettled([...background])
      for (const conv of sessions.values()) conv.close()
      sessions.clear()
    },
    handlers() {
      return {
        migrate: async (params: unknown, ctx: HandlerContext) =>
          migrate(parseMigrateParams(params), { onProgress: (p) => ctx.emit(p), signal: ctx.signal }),
        'vm.tokens': async (params: unknown, ctx: HandlerContext) => ({
          vm: vmParam(params),
          members: await tokens(vmParam(params), ctx.signal),
        }),
        'vm.recover': async (params: unknown, ctx: HandlerContext) =>
          recover(vmParam(params), {
            acceptLoss: (params as { acceptLoss?: unknown } | null)?.acceptLoss === true,
            signal: ctx.signal,
          }),
      } satisfies ControlHandlers<'migrate' | 'vm.tokens' | 'vm.recover'>
    },
    status() {
      return {
        ...counters,
        active: [...busy],
        states: Object.fromEntries(states),
        inDoubt: [...settling.keys()],
        lost: host.ledger.names().filter((n) => host.ledger.lost(n) !== undefined),
      }
    },
    migrate,
    async settled() {
      await Promise.allSettled([...background])
    },
    tokens,
    recover,
  }
}
