import { Conversation } from '../../../vm/migration/conversation.ts'
import { type DestinationOutcome, migrateIn } from '../../../vm/migration/destination.ts'
import {
  MigrationError,
  MigrationInDoubtError,
  MigrationRefusedError,
  MigrationTargetError,
  MigrationTimeoutError,
} from '../../../vm/migration/errors.ts'
import type {
  MigrationChannel,
  MigrationNetwork,
  MigrationProgress,
  MigrationReport,
  RamCache,
  SwitchRecord,
  VmHost,
} from '../../../vm/migration/interfaces.ts'
import { settleSwitch } from '../../../vm/migration/settle.ts'
import { type MigrationTuning, migrateOut } from '../../../vm/migration/source.ts'
import type { DestinationState, SourceState } from '../../../vm/migration/state.ts'
import { decodeMessage, type Message, newSessionId } from '../../../vm/migration/v1/messages.ts'
import { AbortError, describeError, MeshError, UsageError } from '../../base/errors.ts'
import type { Logger } from '../../base/log.ts'
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
  /** Every state change of every session (see vm/migration/state.ts): metrics, logs, tests. */
  onState?: (e: MigrationStateEvent) => void
  /** Progress of every move out of this host, whoever asked for it (metrics, the web view). */
  onProgress?: (p: MigrationProgress) => void
  /** Every completed move out of this host (metrics, the web view). */
  onReport?: (r: MigrationReport) => void
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

export interface MigrateParams {
  vm: string
  to: string
  deadlineMs?: number
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
}

/** Checks and normalises the control API's `migrate` params. */
export function parseMigrateParams(params: unknown): MigrateParams {
  if (typeof params !== 'object' || params === null) throw new UsageError('migrate: params must be an object')
  const p = params as Record<string, unknown>
  if (typeof p.vm !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(p.vm))
    throw new UsageError('migrate: vm must be a VM name')
  if (typeof p.to !== 'string' || p.to.length === 0 || p.to.length > 256)
    throw new UsageError('migrate: to must be a member name or PeerId')
  const out: MigrateParams = { vm: p.vm, to: p.to }
  if (p.deadlineMs !== undefined && p.deadlineMs !== null) {
    if (typeof p.deadlineMs !== 'number' || !Number.isInteger(p.deadlineMs) || p.deadlineMs < 1000)
      throw new UsageError('migrate: deadlineMs must be an integer of at least 1000')
    out.deadlineMs = p.deadlineMs
  }
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
  const outcomes = new Map<string, DestinationOutcome | 'pending'>()
  const busy = new Set<string>()
  /** The state of each session running now, by VM name ('out:precopy', 'in:receiving'...). */
  const states = new Map<string, string>()
  const stateOf =
    (vm: string, direction: 'out' | 'in', peer: string) =>
    (t: { from: SourceState | DestinationState; to: SourceState | DestinationState; atMs: number }) => {
      states.set(vm, `${direction}:${t.to}`)
      init.onState?.({ vm, direction, peer, from: t.from, to: t.to, atMs: t.atMs })
    }
  /** VMs whose last move out is in doubt (paused here until the destination answers), by name. */
  const settling = new Map<string, SwitchRecord>()
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
    settling.set(record.vm, record)
    log.warn('settling an unfinished switch with the destination', {
      vm: record.vm,
      to: record.to,
      token: record.token,
    })
    void track(
      settleSwitch({ network, register, host, log, record, signal: ac.signal })
        .then(
          (outcome) => log.info('switch settled', { vm: record.vm, to: record.to, outcome }),
          (err: unknown) => {
            if (!(err instanceof AbortError))
              log.error('settling a switch failed', { vm: record.vm, error: describeError(err) })
          },
        )
        .finally(() => settling.delete(record.vm)),
    )
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
        const conv = new Conversation(ch, m.sid)
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
            onState: stateOf(name, 'in', ch.peer),
            ...(init.cache ? { cache: init.cache } : {}),
          })
            .then(
              (o) => outcomes.set(key, o),
              (err: unknown) => {
                counters.failed++
                outcomes.set(key, 'discarded')
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
      case 'query': {
        if (!member) return
        const key = `${m.vm}#${m.token}`
        const vm = host.get(m.vm)
        const outcome = outcomes.get(key)
        // 'running' also when it ran here under that token and moved on since: either way the source
        // must not resume its copy.
        const state =
          (vm !== undefined && host.token(m.vm) >= m.token) || outcome === 'running'
            ? 'running'
            : (outcome ?? 'absent')
        const conv = new Conversation(ch, m.sid)
        conv.trySend({ type: 'query-reply', sid: m.sid, vm: m.vm, state, token: host.token(m.vm) })
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
        const params: MigrateParams = { vm: m.vm, to: m.to }
        if (m.deadlineMs !== undefined) params.deadlineMs = m.deadlineMs
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

  const runLocal = async (
    params: MigrateParams,
    options: { onProgress?: (p: MigrationProgress) => void; signal?: AbortSignal },
  ): Promise<MigrationReport> => {
    const vm = host.get(params.vm)
    if (vm === undefined) throw new MigrationTargetError(`VM '${params.vm}' does not run here`)
    const doubt = settling.get(params.vm)
    if (doubt !== undefined)
      throw new MigrationRefusedError(
        `VM '${params.vm}' is paused here until ${doubt.to} says whether it resumed the last move (token ${doubt.token})`,
        { code: 'E_MIGRATION_IN_DOUBT' },
      )
    const to = resolvePeer(params.to)
    if (to === network.self) throw new UsageError(`VM '${params.vm}' already runs on ${to}`)
    if (!init.isMember(to)) throw new MigrationRefusedError(`${to} is not a member`)
    if (busy.has(params.vm)) throw new MigrationRefusedError(`VM '${params.vm}' is already migrating`)
    busy.add(params.vm)
    counters.out++
    const signal = options.signal === undefined ? ac.signal : AbortSignal.any([options.signal, ac.signal])
    try {
      const report = await migrateOut({
        network,
        register,
        host,
        log,
        vm,
        to,
        signal,
        onState: stateOf(params.vm, 'out', to),
        ...(params.deadlineMs === undefined ? {} : { deadlineMs: params.deadlineMs }),
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
        const record = host.switches?.().find((r) => r.vm === params.vm)
        if (record !== undefined) settle(record)
      }
      throw err
    } finally {
      busy.delete(params.vm)
      states.delete(params.vm)
    }
  }

  /** Asks every linked member whether it runs the VM; the first 'here' wins. */
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
      if (found === undefined)
        throw new MigrationTargetError(
          `no reachable member runs a VM named '${vm}' (see 'mesh vm ls' on each host)`,
        )
      return found
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
    const conv = new Conversation(ch, sid)
    const unregister = register(sid, conv)
    try {
      const req: Message = { type: 'request', sid, vm: params.vm, to: params.to }
      if (params.deadlineMs !== undefined) req.deadlineMs = params.deadlineMs
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
          options.onProgress?.(m.event as unknown as MigrationProgress)
          continue
        }
        if (m.ok && m.report !== undefined) return m.report as unknown as MigrationReport
        const e = m.error ?? { code: 'E_MIGRATION', message: 'the migration failed' }
        throw e.code === 'E_NOT_MEMBER'
          ? new MigrationRefusedError(e.message, { code: e.code })
          : new MeshError(`${ch.peer}: ${e.message}`, { code: e.code })
      }
    } catch (err) {
      if (err instanceof AbortError)
        conv.trySend({ type: 'abort', sid, code: 'E_ABORTED', reason: 'cancelled' })
      if (err instanceof MigrationTimeoutError) throw err
      throw err
    } finally {
      unregister()
      conv.close()
    }
  }

  return {
    name: 'migration',
    async start(signal: AbortSignal) {
      ac = new AbortController()
      signal.addEventListener('abort', () => ac.abort(signal.reason), { once: true })
      running = true
      counters = { in: 0, out: 0, refused: 0, failed: 0 }
      for (const ch of network.channels()) attach(ch)
      unsubs.push(network.onChannel(attach))
      // Switches a killed agent left behind (its paused QEMU outlived it): settle them now.
      for (const record of host.switches?.() ?? []) settle(record)
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
      }
    },
    status() {
      return {
        ...counters,
        active: [...busy],
        states: Object.fromEntries(states),
        inDoubt: [...settling.keys()],
      }
    },
    migrate,
    async settled() {
      await Promise.allSettled([...background])
    },
  }
}
