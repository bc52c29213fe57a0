/**
 * The spot service of one agent: hears notices (watchers.ts), reports this host's room to members,
 * reserves room for VMs on their way here, refuses VMs while draining or doomed, and empties the host
 * (evacuate) — on a notice, on `mesh evacuate`, or on `mesh drain`.
 *
 * An evacuation: ask every linked member for its capacity (agent call 'spot.capacity', answers within
 * 2 s or the member is left out), place every VM (placement.ts), report VMs with no room at once, then
 * move the VMs one after the other in priority order: reserve room at the destination ('spot.reserve',
 * which also hands over the VM's spot settings), migrate with the time left until the plan's end (the
 * notice's deadline minus the margin), and on a failure try the next best member while time is left.
 * The report says per VM what happened and when.
 */
import { mkdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { ChunkService } from '../../../net/chunks/exchange.ts'
import type { ChunkStore } from '../../../net/chunks/interfaces.ts'
import type { MemberStatus } from '../../../net/interfaces.ts'
import type { StandbyDiskReader } from '../../../vm/disk/standby.ts'
import type { VmInfo } from '../../../vm/manager.ts'
import type { MigrationProgress, MigrationReport } from '../../../vm/migration/interfaces.ts'
import type { VmSpec } from '../../../vm/spec.ts'
import { linkedController } from '../../base/abort.ts'
import { AbortError, describeError, MeshError, UsageError } from '../../base/errors.ts'
import { writeFileDurable } from '../../base/fs.ts'
import type { Logger } from '../../base/log.ts'
import type { ControlHandlers, StandbyRow } from '../../control/api.ts'
import type { HandlerContext } from '../../control/server.ts'
import type { AgentCalls } from '../calls/calls.ts'
import type { AgentService } from '../interfaces.ts'
import type {
  CapacityReport,
  EvacuationEvent,
  EvacuationReason,
  EvacuationReport,
  VmEvacuation,
  VmSpotMeta,
} from './interfaces.ts'
import { type Notice, type NoticeWatcher, pause } from './notice.ts'
import { type Candidate, type PlacementVm, place, type Room } from './placement.ts'
import {
  DEFAULT_STANDBY_RATE,
  parseSyncParams,
  pullStandby,
  type RamIndex,
  runStandbySender,
  STANDBY_DISK_PIN,
  STANDBY_PIN,
  type StandbyStatus,
  type SyncResult,
  standbyBytesToSend,
} from './standby.ts'

/** This host takes no VM now (draining, under a notice, or full). */
export class SpotRefusedError extends MeshError {}
export class EvacuationError extends MeshError {}

export interface SpotServiceInit {
  stateDir: string
  log: Logger
  calls: AgentCalls
  self: () => { peer: string; name: string }
  members: () => MemberStatus[]
  /** The VMs of this host; `diskBytes`: the size of its writable disk (counts against --capacity disk). */
  vms: () => Promise<(VmInfo & { diskBytes?: number })[]>
  migrate(
    params: { vm: string; to: string; deadlineMs?: number },
    options: { onProgress?: (p: MigrationProgress) => void; signal?: AbortSignal },
  ): Promise<MigrationReport>
  watcher?: NoticeWatcher
  labels?: Record<string, string>
  /** Room offered to VMs on this host. */
  offered: Room
  /** Finish this long before a notice's deadline (default: the larger of 3 s and a tenth of the notice). */
  marginMs?: number
  /** On an AWS rebalance recommendation: 'evacuate' at once, or only 'report' it (default). */
  onRebalance?: 'evacuate' | 'report'
  /** How long members have to answer 'spot.capacity' (default 2 s). */
  capacityTimeoutMs?: number
  /** Moves under way at once, never two to one member (default 2). */
  parallel?: number
  /** Warm standbys (standby.ts): the RAM index the chunk service serves from, the chunk layer (after
   *  its start), and the RAM file of a VM running here. Without it, this host neither keeps nor feeds
   *  standbys. */
  standby?: {
    index: RamIndex
    chunks: () => { service: ChunkService; store: ChunkStore }
    ramPath: (vm: string) => Promise<string | undefined>
    /** The writable disk of a VM running here, as a standby reads it (vm/disk/standby.ts). */
    disk?: (vm: string) => StandbyDiskReader | undefined
    /** Least time between two passes of one VM (default 2 s). */
    minIntervalMs?: number
  }
  now?: () => number
}

/** Unpins what this host holds as a VM's standby (RAM and disk), as far as it is pinned. */
async function unpinStandby(store: ChunkStore, vm: string): Promise<void> {
  const pins = store.pins()
  for (const pin of [STANDBY_PIN(vm), STANDBY_DISK_PIN(vm)]) if (pins.has(pin)) await store.unpin(pin)
}

export interface SpotService extends AgentService {
  handlers(): ControlHandlers<'evacuate' | 'drain' | 'spot.set' | 'spot.vms' | 'spot.status'>
  /** Throws SpotRefusedError when this host must not take the VM (draining, doomed, no room). */
  admit(spec: Pick<VmSpec, 'name' | 'memoryMiB' | 'vcpus' | 'volume'>): void
  evacuate(options: {
    reason: EvacuationReason
    to?: string
    /** Moves at once (default: the service's, 2). */
    parallel?: number
    deadlineAt?: number
    startedAt?: number
    onEvent?: (e: EvacuationEvent) => void
    signal?: AbortSignal
  }): Promise<EvacuationReport>
  capacity(): Promise<CapacityReport>
  /** Resolves when the evacuation a notice started has ended (tests). */
  idle(): Promise<void>
}

interface Persisted {
  draining: boolean
  vms: Record<string, VmSpotMeta>
}

const LIVE = new Set(['incoming', 'running', 'paused'])
const RESERVE_TTL_MS = 120_000

function num(v: unknown, what: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max)
    throw new UsageError(`${what} must be a number from ${min} to ${max}`)
  return v
}

function parseRoom(v: unknown): Room {
  const o = (v ?? {}) as Record<string, unknown>
  return {
    ramMiB: num(o.ramMiB, 'ramMiB', 0, 2 ** 30),
    diskBytes: num(o.diskBytes ?? 0, 'diskBytes', 0, 2 ** 53),
    vcpus: num(o.vcpus, 'vcpus', 0, 4096),
  }
}

function parseMeta(v: unknown): VmSpotMeta {
  const o = (v ?? {}) as Record<string, unknown>
  const m: VmSpotMeta = {}
  if (o.priority !== undefined) m.priority = Math.round(num(o.priority, 'priority', -1000, 1000))
  if (o.standby !== undefined) {
    if (typeof o.standby !== 'string' || o.standby.length === 0 || o.standby.length > 128)
      throw new UsageError('standby must be auto or a member')
    m.standby = o.standby
  }
  if (o.standbyRateBps !== undefined) m.standbyRateBps = num(o.standbyRateBps, 'standbyRateBps', 1, 2 ** 40)
  return m
}

const VM_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/

export function createSpotService(init: SpotServiceInit): SpotService {
  const { log, calls } = init
  const now = init.now ?? Date.now
  const labels = { ...(init.labels ?? {}) }
  const file = join(init.stateDir, 'spot.json')
  let state: Persisted = { draining: false, vms: {} }
  /** Room promised to VMs on their way here, by VM name. */
  const reservations = new Map<string, { need: Room; until: number; from: string }>()
  let notice: Notice | undefined
  let running:
    | { promise: Promise<EvacuationReport>; listeners: Set<(e: EvacuationEvent) => void> }
    | undefined
  let lastReport: EvacuationReport | undefined
  let ac = new AbortController()
  const background = new Set<Promise<unknown>>()
  /** VMs here at the last look (admit() is synchronous; refreshed by every capacity computation). */
  let lastVms: (VmInfo & { diskBytes?: number })[] = []
  /** Standbys this host keeps for VMs elsewhere: VM → the host that feeds it, last pass. */
  const held = new Map<string, { from: string; syncedAt: number; last: SyncResult }>()
  /** Sender loops of VMs here that have a standby. */
  const senders = new Map<
    string,
    { status: StandbyStatus; ac: AbortController; done: Promise<void>; keep: boolean }
  >()
  /** Stops the standby syncs (an evacuation needs the link and the CPU) without dropping the copies. */
  const pauseSenders = () => {
    for (const snd of senders.values()) {
      snd.keep = true
      snd.ac.abort(new AbortError('evacuating'))
    }
  }
  let lastGc = 0

  let writing: Promise<void> = Promise.resolve()
  const persist = () => {
    const body = JSON.stringify(state)
    writing = writing.then(async () => {
      await mkdir(init.stateDir, { recursive: true, mode: 0o700 })
      await writeFileDurable(file, body)
    })
    return writing
  }

  const used = (vms: (VmInfo & { diskBytes?: number })[]): Room => {
    const here = new Set<string>()
    const u: Room = { ramMiB: 0, diskBytes: 0, vcpus: 0 }
    for (const v of vms) {
      if (!LIVE.has(v.status)) continue
      here.add(v.name)
      u.ramMiB += v.memoryMiB
      u.vcpus += v.vcpus
      u.diskBytes += v.diskBytes ?? 0
    }
    const t = now()
    for (const [name, r] of reservations) {
      // A reservation ends when its VM arrived (it counts as a VM now) or it expired.
      if (here.has(name) || r.until < t) {
        reservations.delete(name)
        continue
      }
      u.ramMiB += r.need.ramMiB
      u.vcpus += r.need.vcpus
      u.diskBytes += r.need.diskBytes
    }
    return u
  }
  const freeOf = (u: Room): Room => ({
    ramMiB: Math.max(0, init.offered.ramMiB - u.ramMiB),
    diskBytes: Math.max(0, init.offered.diskBytes - u.diskBytes),
    vcpus: Math.max(0, init.offered.vcpus - u.vcpus),
  })

  const capacity = async (): Promise<CapacityReport> => {
    lastVms = await init.vms()
    const u = used(lastVms)
    const self = init.self()
    return {
      peer: self.peer,
      name: self.name,
      labels,
      total: { ...init.offered },
      used: u,
      free: freeOf(u),
      vms: lastVms.filter((v) => LIVE.has(v.status)).length,
      draining: state.draining,
      ...(notice?.deadlineAt === undefined || notice.kind === 'rebalance'
        ? {}
        : { noticeDeadlineAt: notice.deadlineAt }),
      standbys: [...held.keys()].filter((vm) => !lastVms.some((v) => v.name === vm && LIVE.has(v.status))),
    }
  }

  const doomed = () => notice !== undefined && notice.kind !== 'rebalance'

  const refusal = (): string | undefined => {
    if (doomed()) return `this host is under a spot notice (${notice!.detail}); it takes no VMs`
    if (state.draining) return "this host is draining; 'mesh drain --off' lets it take VMs again"
    return undefined
  }

  const admit: SpotService['admit'] = (spec) => {
    const why = refusal()
    if (why !== undefined) throw new SpotRefusedError(why, { code: 'E_SPOT_REFUSED' })
    const r = reservations.get(spec.name)
    if (r !== undefined && r.until >= now()) return
    const free = freeOf(used(lastVms))
    const disk = (spec.volume?.sizeGiB ?? 0) * 2 ** 30
    if (spec.memoryMiB > free.ramMiB || spec.vcpus > free.vcpus || disk > free.diskBytes)
      throw new SpotRefusedError(
        `no room for VM '${spec.name}' here: it needs ${spec.memoryMiB} MiB, ${spec.vcpus} vCPU and ${Math.ceil(disk / 2 ** 30)} GiB of disk; ${free.ramMiB} MiB, ${free.vcpus} vCPU and ${Math.floor(free.diskBytes / 2 ** 30)} GiB are free (--capacity)`,
        { code: 'E_NO_ROOM' },
      )
  }

  const peerHandlers = {
    'spot.capacity': async () => capacity(),
    'spot.reserve': async (params: unknown, ctx: { peer: string }) => {
      const p = (params ?? {}) as Record<string, unknown>
      if (typeof p.vm !== 'string' || !VM_RE.test(p.vm)) throw new UsageError('reserve: vm must be a VM name')
      const need = parseRoom(p.need)
      const meta = parseMeta(p.meta)
      const why = refusal()
      if (why !== undefined) throw new SpotRefusedError(why, { code: 'E_SPOT_REFUSED' })
      await capacity()
      reservations.delete(p.vm)
      const free = freeOf(used(lastVms))
      if (need.ramMiB > free.ramMiB || need.vcpus > free.vcpus || need.diskBytes > free.diskBytes)
        throw new SpotRefusedError(
          `no room for '${p.vm}': ${free.ramMiB} MiB, ${free.vcpus} vCPU free (someone else took it first)`,
          { code: 'E_NO_ROOM' },
        )
      const until = now() + RESERVE_TTL_MS
      reservations.set(p.vm, { need, until, from: ctx.peer })
      // The VM's settings come along, so its priority and standby survive the move.
      state.vms[p.vm] = meta
      await persist()
      return { reserved: true, until }
    },
    'spot.release': async (params: unknown, ctx: { peer: string }) => {
      const vm = String((params as { vm?: unknown } | null)?.vm ?? '')
      const r = reservations.get(vm)
      if (r !== undefined && r.from === ctx.peer) reservations.delete(vm)
      return { released: r !== undefined }
    },
  }
  const standbyHandlers = {
    'standby.sync': async (params: unknown, ctx: { peer: string; signal: AbortSignal }) => {
      const sb = init.standby
      if (sb === undefined)
        throw new SpotRefusedError('this agent keeps no standbys', { code: 'E_NO_STANDBY' })
      const p = parseSyncParams(params)
      lastVms = await init.vms()
      if (lastVms.some((v) => v.name === p.vm && LIVE.has(v.status)))
        throw new SpotRefusedError(`VM '${p.vm}' runs here: this host cannot be its standby`, {
          code: 'E_SPOT_REFUSED',
        })
      const r = await pullStandby(sb.chunks(), ctx.peer, p, ctx.signal)
      held.set(p.vm, { from: ctx.peer, syncedAt: now(), last: r })
      if (now() - lastGc > 30_000) {
        // The previous pass's chunks that changed are garbage now: collect now and then, not every pass.
        lastGc = now()
        await sb.chunks().store.gc()
      }
      return r
    },
    'standby.drop': async (params: unknown, ctx: { peer: string }) => {
      const vm = String((params as { vm?: unknown } | null)?.vm ?? '')
      const h = held.get(vm)
      if (h === undefined || h.from !== ctx.peer) return { dropped: false }
      held.delete(vm)
      if (init.standby !== undefined) await unpinStandby(init.standby.chunks().store, vm)
      return { dropped: true }
    },
  }
  calls.register(peerHandlers)
  calls.register(standbyHandlers)

  /** Asks every linked member for its room, in parallel; a silent member is left out (and said so). */
  const gather = async (signal: AbortSignal) => {
    const self = init.self()
    const members = init.members().filter((m) => !m.self && m.peerId !== self.peer && m.link === 'open')
    const answers = await Promise.all(
      members.map(async (m) => {
        try {
          const r = (await calls.call(
            m.peerId,
            'spot.capacity',
            {},
            {
              timeoutMs: init.capacityTimeoutMs ?? 2000,
              signal,
            },
          )) as CapacityReport
          return { m, report: { ...r, free: parseRoom(r.free) } }
        } catch (err) {
          if (err instanceof AbortError) throw err
          return { m, error: describeError(err) }
        }
      }),
    )
    const candidates: Candidate[] = []
    for (const a of answers) {
      if (a.report === undefined) continue
      const r = a.report
      candidates.push({
        peer: a.m.peerId,
        name: a.m.name,
        labels: typeof r.labels === 'object' && r.labels !== null ? r.labels : {},
        free: r.free,
        draining: r.draining === true,
        underNotice: typeof r.noticeDeadlineAt === 'number',
        ...(a.m.rttMs === undefined ? {} : { rttMs: a.m.rttMs }),
        relayed: a.m.path === 'relay' && a.m.direct === undefined,
        standbys: Array.isArray(r.standbys) ? r.standbys.filter((s) => typeof s === 'string') : [],
      })
    }
    const view = answers.map((a) =>
      a.report === undefined
        ? { name: a.m.name, peer: a.m.peerId, answered: false, error: a.error }
        : { name: a.m.name, peer: a.m.peerId, answered: true, free: a.report.free },
    )
    return { candidates, view }
  }

  const runEvacuation = async (
    opts: Parameters<SpotService['evacuate']>[0],
    emit: (e: EvacuationEvent) => void,
  ): Promise<EvacuationReport> => {
    const startedAt = opts.startedAt ?? now()
    const at = () => now() - startedAt
    const signal = opts.signal === undefined ? ac.signal : AbortSignal.any([opts.signal, ac.signal])
    const margin =
      opts.deadlineAt === undefined
        ? 0
        : (init.marginMs ?? Math.max(3000, Math.round((opts.deadlineAt - startedAt) / 10)))
    const planEnd = opts.deadlineAt === undefined ? undefined : opts.deadlineAt - margin
    const parallel = Math.max(1, opts.parallel ?? init.parallel ?? 2)
    const self = init.self()
    const to = opts.to === undefined ? undefined : resolveMember(opts.to)
    const vms = (await init.vms()).filter((v) => LIVE.has(v.status))
    const meta = (name: string) => state.vms[name] ?? {}
    const pvms: PlacementVm[] = vms.map((v) => ({
      name: v.name,
      memoryMiB: v.memoryMiB,
      vcpus: v.vcpus,
      diskBytes: v.diskBytes ?? 0,
      priority: meta(v.name).priority ?? 0,
    }))
    const results = new Map<string, VmEvacuation>()
    const finish = (): EvacuationReport => {
      const list = pvms
        .map(
          (v) => results.get(v.name) ?? { vm: v.name, priority: v.priority, outcome: 'cancelled' as const },
        )
        .sort((a, b) => b.priority - a.priority || a.vm.localeCompare(b.vm))
      return {
        event: 'report',
        reason: opts.reason,
        host: self.name,
        startedAt: new Date(startedAt).toISOString(),
        ...(opts.deadlineAt === undefined ? {} : { deadlineAt: new Date(opts.deadlineAt).toISOString() }),
        ...(planEnd === undefined ? {} : { planMs: planEnd - startedAt }),
        doneMs: at(),
        complete: list.every((r) => r.outcome === 'moved'),
        vms: list,
      }
    }
    if (pvms.length === 0) {
      emit({ event: 'plan', atMs: at(), assignments: [], unplaced: [], members: [] })
      return finish()
    }
    let { candidates, view } = await gather(signal)
    const plan = place({ vms: pvms, candidates, self: { peer: self.peer, labels }, ...(to ? { to } : {}) })
    const estimate = estimatePlan(
      plan.assignments,
      candidates,
      planEnd === undefined ? undefined : planEnd - now(),
      parallel,
    )
    emit({
      event: 'plan',
      atMs: at(),
      ...(planEnd === undefined ? {} : { planMs: planEnd - startedAt }),
      assignments: plan.assignments,
      unplaced: plan.unplaced,
      members: view,
      estimates: estimate.vms,
      ...(estimate.shortfall === undefined ? {} : { shortfall: estimate.shortfall }),
    })
    for (const u of plan.unplaced) {
      const p = pvms.find((v) => v.name === u.vm)!
      results.set(u.vm, { vm: u.vm, priority: p.priority, outcome: 'no-room', error: u.reason })
      emit({ event: 'no-room', vm: u.vm, reason: u.reason, atMs: at() })
    }
    // Members that failed a VM are not asked again for that VM.
    const excluded = new Map<string, Set<string>>()
    const assigned = new Map(plan.assignments.map((a) => [a.vm, a]))
    // Move order: priority first, then the cheapest moves (a standby at the destination, then less
    // RAM): the VMs that can be saved quickly are not kept waiting behind a big one.
    const cost = (name: string) => {
      const a = assigned.get(name)
      const pv = pvms.find((v) => v.name === name)!
      return (
        (a !== undefined && candidates.find((c) => c.peer === a.to)?.standbys.includes(name) ? 0 : 1) *
          2 ** 32 +
        pv.memoryMiB
      )
    }
    const queue = plan.assignments
      .map((a) => a.vm)
      .sort((x, y) => {
        const px = pvms.find((v) => v.name === x)!.priority
        const py = pvms.find((v) => v.name === y)!.priority
        return py - px || cost(x) - cost(y)
      })
    /** Destinations with a move under way: one move per destination at a time. */
    const busyDest = new Set<string>()
    /** Time left shared by the VMs still to move, in proportion to their RAM (a standby's VM: a quarter). */
    const share = (name: string): number | undefined => {
      if (planEnd === undefined) return undefined
      const left = planEnd - now()
      const weight = (n: string) => {
        const pv = pvms.find((v) => v.name === n)!
        const a = assigned.get(n)
        const standby = a !== undefined && candidates.find((c) => c.peer === a.to)?.standbys.includes(n)
        return pv.memoryMiB * (standby === true ? 0.25 : 1)
      }
      // Moves run `parallel` at a time: a VM's share of the time is its share of its lane's work.
      const lanes = Math.max(1, Math.min(parallel, queue.length + inFlight))
      const total = [name, ...queue].reduce((n, x) => n + weight(x), 0) / lanes
      return Math.max(1000, Math.round(left * Math.min(1, weight(name) / Math.max(total, 1))))
    }
    let inFlight = 0

    const moveOne = async (name: string, a: { to: string; toName: string }): Promise<void> => {
      const pv = pvms.find((v) => v.name === name)!
      const tries = results.get(name)?.tries ?? []
      const fail = (err: unknown) => {
        tries.push(`${a.toName}: ${describeError(err)}`)
        const ex = excluded.get(name) ?? new Set<string>()
        ex.add(a.to)
        excluded.set(name, ex)
        const r: VmEvacuation = {
          vm: name,
          priority: pv.priority,
          outcome: 'failed',
          to: a.to,
          toName: a.toName,
          error: describeError(err),
          code: (err as { code?: string }).code ?? 'E_MIGRATION',
          tries: [...tries],
        }
        results.set(name, r)
        emit({ ...r, event: 'failed', atMs: at() })
        // Another member while time is left (a notice's deadline is the host's death: try until then).
        const left = opts.deadlineAt === undefined ? Number.POSITIVE_INFINITY : opts.deadlineAt - now()
        if (left > 2000 && !signal.aborted && !(err instanceof AbortError) && to === undefined) {
          assigned.delete(name)
          queue.unshift(name)
        }
      }
      try {
        await calls.call(
          a.to,
          'spot.reserve',
          {
            vm: name,
            need: { ramMiB: pv.memoryMiB, vcpus: pv.vcpus, diskBytes: pv.diskBytes },
            meta: meta(name),
          },
          { timeoutMs: 5000, signal },
        )
      } catch (err) {
        if (err instanceof AbortError) return
        fail(err)
        return
      }
      const deadlineMs = share(name)
      const movingAtMs = at()
      emit({
        event: 'moving',
        vm: name,
        to: a.to,
        toName: a.toName,
        ...(deadlineMs === undefined ? {} : { deadlineMs }),
        atMs: at(),
      })
      let lastProgress = 0
      let firstData: { t: number; bytes: number } | undefined
      let warned = false
      let shortSince: number | undefined
      try {
        const report = await init.migrate(
          { vm: name, to: a.to, ...(deadlineMs === undefined ? {} : { deadlineMs }) },
          {
            signal,
            onProgress: (p) => {
              const t = now()
              // Early: once the first copy has moved data for 2 s, say whether it can make the plan's end
              // at the rate it progresses (RAM carried, the destination's cache included).
              if (p.phase === 'bulk' && p.ramBytes > 0) firstData ??= { t, bytes: p.ramBytes }
              // Said only when two looks at least 2 s apart both fall short: the first seconds of a copy
              // that the destination's cache feeds come in bursts (a whole offer's cached chunks at once),
              // and one look there named a shortfall for a move that then ended with 14 s to spare.
              if (
                !warned &&
                planEnd !== undefined &&
                firstData !== undefined &&
                t - firstData.t >= 2000 &&
                p.phaseBytes !== undefined
              ) {
                const rate = ((p.ramBytes - firstData.bytes) * 1000) / (t - firstData.t)
                const left = Math.max(0, p.phaseBytes - (p.phaseDoneBytes ?? 0))
                const eta = rate > 0 ? (left * 1000) / rate : Number.POSITIVE_INFINITY
                if (t + eta <= planEnd) shortSince = undefined
                else shortSince ??= t
                if (shortSince !== undefined && t - shortSince >= 2000) {
                  warned = true
                  emit({
                    event: 'shortfall',
                    vm: name,
                    detail: `${name}: ${(left / 2 ** 20).toFixed(0)} MiB of its first copy left at ${(rate / 1e6).toFixed(1)} MB/s is ${(eta / 1000).toFixed(1)} s, ${((planEnd - t) / 1000).toFixed(1)} s are left before the plan's end (then pre-copy rounds and the pause)`,
                    atMs: at(),
                  })
                }
              }
              if (t - lastProgress < 1000 && p.phase !== 'switch') return
              lastProgress = t
              emit({
                event: 'progress',
                vm: name,
                phase: p.phase,
                round: p.round,
                wireBytes: p.wireBytes,
                ramBytes: p.ramBytes,
                dedupBytes: p.dedupBytes,
                rateBytesPerSec: Math.round(p.rateBytesPerSec),
                dirtyRateBytesPerSec: Math.round(p.dirtyRateBytesPerSec),
                atMs: at(),
              })
            },
          },
        )
        const doneAt = at()
        // With post-copy the guest ran there before its last memory arrived (the report comes after).
        const resumedAtMs =
          report.postcopy === undefined ? undefined : Math.max(0, doneAt - Math.round(report.postcopy.ms))
        const r: VmEvacuation = {
          vm: name,
          priority: pv.priority,
          outcome: 'moved',
          to: a.to,
          toName: a.toName,
          atMs: doneAt,
          movingAtMs,
          totalMs: Math.round(report.totalMs),
          downtimeMs: Math.round(report.downtimeMs),
          wireBytes: report.wireBytes,
          ramBytes: report.ramBytes,
          dedupBytes: report.dedupBytes,
          ...(report.diskWrittenBytes === undefined
            ? {}
            : {
                diskWrittenBytes: report.diskWrittenBytes,
                diskSentBytes: report.diskSentBytes ?? 0,
                diskDedupBytes: report.diskDedupBytes ?? 0,
              }),
          switchReason: report.switchReason,
          ...(report.mode === undefined ? {} : { mode: report.mode }),
          ...(resumedAtMs === undefined ? {} : { resumedAtMs }),
          ...(report.postcopy === undefined
            ? {}
            : { postcopyMs: report.postcopy.ms, postcopyFaults: report.postcopy.faults }),
          ...(report.throttle === undefined ? {} : { throttleMax: report.throttle.maxLevel }),
          ...(report.deadlineMissedByMs ? { deadlineMissedByMs: Math.round(report.deadlineMissedByMs) } : {}),
          ...(tries.length > 0 ? { tries: [...tries] } : {}),
          // (A report from an older agent may lack them.)
          ...(typeof report.timings === 'object' && report.timings !== null
            ? {
                timings: Object.fromEntries(
                  Object.entries(report.timings).map(([k, v]) => [k, Math.round(v)]),
                ),
              }
            : {}),
        }
        results.set(name, r)
        observeRate(a.to, report.wireBytes, report.totalMs)
        delete state.vms[name]
        await persist()
        emit({ ...r, event: 'moved', atMs: r.atMs ?? at() })
      } catch (err) {
        void calls.call(a.to, 'spot.release', { vm: name }, { timeoutMs: 2000 }).catch(() => {})
        if (err instanceof AbortError) return
        fail(err)
      }
    }

    /** Finds a destination again for a VM whose move failed: fresh capacity, without the members that failed it. */
    const replace = async (name: string) => {
      const pv = pvms.find((v) => v.name === name)!
      ;({ candidates, view } = await gather(signal))
      const ex = excluded.get(name) ?? new Set()
      const again = place({
        vms: [pv],
        candidates: candidates.filter((c) => !ex.has(c.peer)),
        self: { peer: self.peer, labels },
        ...(to ? { to } : {}),
      })
      const a = again.assignments[0]
      if (a === undefined) {
        const reason = again.unplaced[0]?.reason ?? 'no member left to try'
        const tries = results.get(name)?.tries ?? []
        results.set(name, {
          vm: name,
          priority: pv.priority,
          outcome: tries.length > 0 ? 'failed' : 'no-room',
          error: reason,
          ...(tries.length > 0 ? { tries } : {}),
        })
        emit({ event: 'no-room', vm: name, reason, atMs: at() })
        return
      }
      assigned.set(name, a)
    }

    await new Promise<void>((resolve) => {
      const running = new Set<Promise<void>>()
      const pump = () => {
        if (signal.aborted) queue.length = 0
        while (running.size < parallel) {
          // The first VM (in order) whose destination has no move under way.
          const k = queue.findIndex((n) => {
            const a = assigned.get(n)
            return a === undefined || !busyDest.has(a.to)
          })
          if (k < 0) break
          const name = queue.splice(k, 1)[0]!
          const p = (async () => {
            if (!assigned.has(name)) await replace(name)
            const a = assigned.get(name)
            if (a === undefined) return
            if (busyDest.has(a.to)) {
              queue.unshift(name)
              return
            }
            busyDest.add(a.to)
            inFlight++
            try {
              await moveOne(name, a)
            } finally {
              inFlight--
              busyDest.delete(a.to)
            }
          })()
          running.add(p)
          void p.finally(() => {
            running.delete(p)
            pump()
          })
        }
        if (running.size === 0 && (queue.length === 0 || signal.aborted)) resolve()
        else if (running.size === 0) {
          // Every VM left waits for a destination that is not busy: cannot happen with nothing running.
          resolve()
        }
      }
      pump()
    })
    return finish()
  }

  /** Starts a sender for every VM here with a standby; drops standbys this host keeps for VMs now here. */
  const reconcile = async () => {
    const sb = init.standby
    if (sb === undefined) return
    lastVms = await init.vms()
    const here = new Set(lastVms.filter((v) => LIVE.has(v.status)).map((v) => v.name))
    for (const vm of [...held.keys()]) {
      if (!here.has(vm)) continue
      // It arrived (most likely by an evacuation to its standby): the copy is the VM's own RAM now.
      held.delete(vm)
      await unpinStandby(sb.chunks().store, vm).catch(() => {})
    }
    for (const vm of here) {
      const m = state.vms[vm]
      if (m?.standby === undefined || senders.has(vm) || doomed() || running !== undefined) continue
      const status: StandbyStatus = { vm, state: 'choosing', passes: 0 }
      const ctl = new AbortController()
      const signal = AbortSignal.any([ctl.signal, ac.signal])
      const done = runStandbySender(
        vm,
        {
          index: sb.index,
          ramPath: sb.ramPath,
          rateBps: (name) => state.vms[name]?.standbyRateBps ?? DEFAULT_STANDBY_RATE,
          ...(sb.disk === undefined ? {} : { disk: sb.disk }),
          ...(sb.minIntervalMs === undefined ? {} : { minIntervalMs: sb.minIntervalMs }),
          warn: (msg, f) => log.warn(msg, f),
          choose: (name) => chooseStandby(name, signal),
          sync: async (peer, params, sig) => {
            const rate = params.rateBps
            // A pass of the whole RAM (and what the disk's overlay holds) at the standby rate, and then some.
            const v = lastVms.find((x) => x.name === name)
            const bytes =
              (v?.memoryMiB ?? 1024) * 2 ** 20 + (params.disk === undefined ? 0 : (v?.diskBytes ?? 0))
            const timeoutMs = Math.max(60_000, (bytes * 2000) / rate)
            const r = (await calls.call(peer, 'standby.sync', params, {
              timeoutMs,
              signal: sig,
            })) as SyncResult
            observeRate(peer, r.fetchedBytes, r.ms)
            ramSeen.set(name, r.fetchedBytes + r.presentBytes)
            return r
          },
        },
        status,
        signal,
      )
        .catch((err: unknown) => log.warn('standby sender ended', { vm, error: describeError(err) }))
        .finally(() => {
          const keep = senders.get(vm)?.keep === true
          senders.delete(vm)
          // The VM left or stopped: the standby's copy is of no use to it (unless it went there). Not
          // when an evacuation paused the sync: the copy is what the evacuation counts on.
          if (status.peer !== undefined && !keep)
            void calls.call(status.peer, 'standby.drop', { vm }, { timeoutMs: 5000 }).catch(() => {})
        })
      senders.set(vm, { status, ac: ctl, done, keep: false })
      const name = vm
      log.info('standby sync started', { vm: name, standby: m.standby })
    }
    for (const [vm, snd] of senders) {
      const m = state.vms[vm]
      if (!here.has(vm) || m?.standby === undefined) snd.ac.abort(new AbortError('standby off'))
    }
  }

  const chooseStandby = async (vm: string, signal: AbortSignal) => {
    const want = state.vms[vm]?.standby
    if (want === undefined) return undefined
    const self = init.self()
    if (want !== 'auto') {
      const peer = resolveMember(want)
      if (peer === self.peer) return undefined
      return { peer, name: init.members().find((m) => m.peerId === peer)?.name ?? peer }
    }
    const v = lastVms.find((x) => x.name === vm)
    if (v === undefined) return undefined
    const { candidates } = await gather(signal)
    const plan = place({
      vms: [{ name: vm, memoryMiB: v.memoryMiB, vcpus: v.vcpus, diskBytes: v.diskBytes ?? 0, priority: 0 }],
      candidates,
      self: { peer: self.peer, labels },
    })
    const a = plan.assignments[0]
    return a === undefined ? undefined : { peer: a.to, name: a.toName }
  }

  /** The most a standby can lack: the VM's non-zero RAM last seen (else its size) and its disk's overlay. */
  const standbyCap = (vm: string, st: StandbyStatus) =>
    (ramSeen.get(vm) ?? (lastVms.find((x) => x.name === vm)?.memoryMiB ?? 0) * 2 ** 20) +
    (st.disk?.heldBytes ?? 0)

  const standbyView = () => {
    const out: Record<string, StandbyRow> = {}
    for (const [vm, snd] of senders) {
      const st = snd.status
      out[vm] = {
        ...st,
        // What a move there would carry now (`vm ls`): right after a pass the status counts only what
        // that pass missed, while the guest went on writing.
        ...(st.lagBytes === undefined ? {} : { lagBytes: standbyBytesToSend(st, now(), standbyCap(vm, st)) }),
        ...(st.syncedAt === undefined ? {} : { lagMs: now() - st.syncedAt }),
      }
    }
    return out
  }

  /** Bytes per second seen to each member (standby passes, moves): what the plan's estimate uses. */
  const rates = new Map<string, { bps: number; at: number }>()
  const observeRate = (peer: string, bytes: number, ms: number) => {
    // Small transfers say more about round trips than about the link's rate.
    if (bytes < 4 * 2 ** 20 || ms <= 0) return
    const bps = (bytes * 1000) / ms
    const old = rates.get(peer)
    rates.set(peer, { bps: old === undefined ? bps : 0.5 * old.bps + 0.5 * bps, at: now() })
  }
  /** Non-zero RAM of VMs here, from their standby manifests (else the VM's size is the bound). */
  const ramSeen = new Map<string, number>()

  /**
   * What the plan should take, per VM: bytes to send (a standby's lag, else the non-zero RAM last seen,
   * else the whole RAM: an upper bound) over the rate last seen to that member; moves to one member run
   * one after the other, `parallel` at once overall. A total over the time left is a shortfall, said
   * with the plan, at the notice (not at the deadline).
   */
  const estimatePlan = (
    assignments: readonly { vm: string; to: string; toName: string }[],
    candidates: readonly Candidate[],
    leftMs: number | undefined,
    parallel: number,
  ) => {
    const vms: NonNullable<Extract<EvacuationEvent, { event: 'plan' }>['estimates']> = []
    const perDest = new Map<string, number>()
    const diverge: string[] = []
    let total = 0
    let unknown = false
    for (const a of assignments) {
      const v = lastVms.find((x) => x.name === a.vm)
      const sb = senders.get(a.vm)?.status
      const standbyThere = candidates.find((c) => c.peer === a.to)?.standbys.includes(a.vm) === true
      let bytes: number
      let basis: string
      if (standbyThere && sb?.lagBytes !== undefined && sb.peer === a.to) {
        bytes = standbyBytesToSend(sb, now(), standbyCap(a.vm, sb))
        basis = 'standby lag + changed since its last pass'
      } else if (ramSeen.has(a.vm)) {
        bytes = ramSeen.get(a.vm)!
        basis = 'non-zero RAM'
      } else {
        bytes = (v?.memoryMiB ?? 0) * 2 ** 20
        basis = 'RAM size (upper bound)'
      }
      const rate = rates.get(a.to)?.bps
      // Pre-copy only gains on a guest at the link's rate less the guest's write rate (when known).
      const dirty = sb?.dirtyRateBps ?? 0
      const net = rate === undefined ? undefined : rate - dirty
      let ms: number | undefined
      if (net !== undefined && net <= 0) {
        ms = Number.POSITIVE_INFINITY
        diverge.push(
          `${a.vm} writes ${(dirty / 1e6).toFixed(1)} MB/s, more than the ${((rate ?? 0) / 1e6).toFixed(1)} MB/s seen to ${a.toName}`,
        )
      } else if (net !== undefined) ms = Math.round((bytes * 1000) / net)
      if (ms === undefined) unknown = true
      else {
        perDest.set(a.to, (perDest.get(a.to) ?? 0) + ms)
        total += ms
      }
      vms.push({
        vm: a.vm,
        to: a.toName,
        bytes,
        basis,
        ...(rate === undefined ? {} : { rateBps: Math.round(rate) }),
        ...(dirty > 0 ? { dirtyRateBps: dirty } : {}),
        ...(ms === undefined || !Number.isFinite(ms) ? {} : { ms }),
      })
    }
    const needMs = Math.max(0, ...perDest.values(), total / Math.max(1, parallel))
    let shortfall: string | undefined
    if (diverge.length > 0)
      shortfall = `pre-copy cannot converge (${diverge.join('; ')}): the pause will hold what is still dirty`
    else if (leftMs !== undefined && !unknown && needMs > leftMs)
      shortfall = `the moves need about ${(needMs / 1000).toFixed(1)} s at the rates last seen, ${(leftMs / 1000).toFixed(1)} s are left: ${((needMs - leftMs) / 1000).toFixed(1)} s short`
    return { vms, shortfall }
  }

  const resolveMember = (ref: string): string => {
    const ms = init.members().filter((m) => !m.self)
    const exact = ms.find((m) => m.peerId === ref || m.name === ref)
    if (exact !== undefined) return exact.peerId
    const byPrefix = ms.filter((m) => m.peerId.startsWith(ref))
    if (byPrefix.length === 1) return byPrefix[0]!.peerId
    throw new UsageError(
      byPrefix.length > 1
        ? `'${ref}' matches several members`
        : `no member named '${ref}' (see 'mesh peers')`,
    )
  }

  const evacuate: SpotService['evacuate'] = (opts) => {
    if (running !== undefined) {
      // One evacuation at a time: a second caller follows the one under way.
      if (opts.onEvent !== undefined) running.listeners.add(opts.onEvent)
      const r = running
      return r.promise.finally(() => {
        if (opts.onEvent !== undefined) r.listeners.delete(opts.onEvent)
      })
    }
    const listeners = new Set<(e: EvacuationEvent) => void>()
    if (opts.onEvent !== undefined) listeners.add(opts.onEvent)
    pauseSenders()
    const emit = (e: EvacuationEvent) => {
      logEvent(e)
      for (const l of listeners) {
        try {
          l(e)
        } catch {
          // A listener that throws (a closed control socket) must not stop the evacuation.
        }
      }
    }
    const promise = runEvacuation(opts, emit)
      .then((report) => {
        lastReport = report
        emit(report)
        return report
      })
      .finally(() => {
        running = undefined
      })
    running = { promise, listeners }
    return promise
  }

  const logEvent = (e: EvacuationEvent) => {
    switch (e.event) {
      case 'plan':
        if (e.shortfall !== undefined) log.warn('shortfall', { detail: e.shortfall })
        log.info('evacuation plan', {
          assignments: e.assignments.map((a) => `${a.vm}->${a.toName}`).join(','),
          unplaced: e.unplaced.length,
          planMs: e.planMs,
        })
        break
      case 'no-room':
        log.warn('no room for a VM', { vm: e.vm, reason: e.reason })
        break
      case 'shortfall':
        log.warn('shortfall', { vm: e.vm, detail: e.detail, atMs: e.atMs })
        break
      case 'moving':
        log.info('evacuating a VM', { vm: e.vm, to: e.toName, deadlineMs: e.deadlineMs, atMs: e.atMs })
        break
      case 'moved':
        log.info('VM evacuated', {
          vm: e.vm,
          to: e.toName,
          atMs: e.atMs,
          downtimeMs: e.downtimeMs,
          ...(e.mode === undefined ? {} : { mode: e.mode }),
          ...(e.resumedAtMs === undefined ? {} : { resumedAtMs: e.resumedAtMs }),
          ...(e.throttleMax === undefined ? {} : { throttleMax: e.throttleMax }),
          ...(e.deadlineMissedByMs === undefined ? {} : { deadlineMissedByMs: e.deadlineMissedByMs }),
        })
        break
      case 'failed':
        log.warn('evacuating a VM failed', { vm: e.vm, to: e.toName, error: e.error })
        break
      case 'report':
        log.info('evacuation done', {
          complete: e.complete,
          doneMs: e.doneMs,
          moved: e.vms.filter((v) => v.outcome === 'moved').length,
          of: e.vms.length,
        })
        break
      default:
        break
    }
  }

  const onNotice = (n: Notice) => {
    log.warn('spot notice', {
      provider: n.provider,
      kind: n.kind,
      detail: n.detail,
      ...(n.deadlineAt === undefined ? {} : { inMs: n.deadlineAt - now() }),
    })
    if (n.kind === 'rebalance' && init.onRebalance !== 'evacuate') return
    if (notice === undefined || notice.kind === 'rebalance') notice = n
    const p = evacuate({
      reason: 'notice',
      startedAt: n.receivedAt,
      ...(n.deadlineAt === undefined ? {} : { deadlineAt: n.deadlineAt }),
      onEvent: () => {},
    })
      .then(async () => {
        // Azure: tell the platform the host is ready to go, once the VMs have left (not before: an
        // acknowledged Preempt may proceed at once).
        if (init.watcher?.acknowledge !== undefined && n.kind !== 'rebalance') {
          await init.watcher.acknowledge(n, ac.signal)
          log.info('notice acknowledged', { provider: n.provider, id: n.id })
        }
      })
      .catch((err: unknown) => {
        if (!(err instanceof AbortError))
          log.error('evacuation after a notice failed', { error: describeError(err) })
      })
    background.add(p)
    void p.finally(() => background.delete(p))
  }

  return {
    name: 'spot',
    admit,
    evacuate,
    capacity,
    async idle() {
      await Promise.allSettled([...background])
    },
    async start(signal) {
      // Follows the agent's lifetime; stop() aborts it, which also drops the listener on `signal`.
      ac = linkedController(signal).controller
      try {
        const o = JSON.parse(await readFile(file, 'utf8')) as Partial<Persisted>
        state = {
          draining: o.draining === true,
          vms: typeof o.vms === 'object' && o.vms !== null ? (o.vms as Record<string, VmSpotMeta>) : {},
        }
      } catch {
        // First start (or a torn file, written again on the next change).
      }
      lastVms = await init.vms()
      if (init.standby !== undefined) {
        const tick = async () => {
          while (!ac.signal.aborted) {
            await reconcile().catch((err: unknown) =>
              log.warn('standby check failed', { error: describeError(err) }),
            )
            // pause() removes its abort listener when the time is up (one per tick would pile up).
            await pause(2000, ac.signal)
          }
        }
        const p = tick()
        background.add(p)
        void p.finally(() => background.delete(p))
      }
      if (init.watcher !== undefined) {
        const w = init.watcher
        log.info('watching for spot notices', { source: w.describe })
        const p = w.run(
          (n) => onNotice(n),
          ac.signal,
          (id) => {
            if (notice?.id !== id) return
            // Withdrawn (a cancelled event, the operator's file gone): the host takes VMs again. An
            // evacuation under way finishes: the moves it made are safe either way.
            log.warn('spot notice withdrawn', { provider: notice.provider, id })
            notice = undefined
          },
        )
        background.add(p)
        void p.finally(() => background.delete(p))
      }
    },
    async stop() {
      ac.abort(new AbortError('agent stopping'))
      await Promise.allSettled([...background, ...[...senders.values()].map((x) => x.done)])
      await init.standby?.index.close()
      await writing.catch(() => {})
    },
    handlers() {
      return {
        evacuate: async (params: unknown, ctx: HandlerContext) => {
          const p = (params ?? {}) as Record<string, unknown>
          return evacuate({
            reason: 'evacuate',
            ...(typeof p.to === 'string' && p.to !== '' ? { to: p.to } : {}),
            ...(typeof p.deadlineMs === 'number'
              ? { deadlineAt: now() + num(p.deadlineMs, 'deadlineMs', 1000, 86_400_000) }
              : {}),
            onEvent: (e) => ctx.emit(e),
            signal: ctx.signal,
          })
        },
        drain: async (params: unknown, ctx: HandlerContext) => {
          const p = (params ?? {}) as Record<string, unknown>
          if (p.off === true) {
            state.draining = false
            await persist()
            log.info('drain off: this host takes VMs again')
            return { draining: false }
          }
          state.draining = true
          await persist()
          log.info('draining: this host takes no new VMs and empties itself')
          const report = await evacuate({
            reason: 'drain',
            ...(typeof p.to === 'string' && p.to !== '' ? { to: p.to } : {}),
            ...(typeof p.deadlineMs === 'number'
              ? { deadlineAt: now() + num(p.deadlineMs, 'deadlineMs', 1000, 86_400_000) }
              : {}),
            onEvent: (e) => ctx.emit(e),
            signal: ctx.signal,
          })
          return report
        },
        'spot.set': async (params: unknown) => {
          const p = (params ?? {}) as Record<string, unknown>
          if (typeof p.vm !== 'string' || !VM_RE.test(p.vm))
            throw new UsageError('spot.set: vm must be a VM name')
          const off = (p.meta as { standby?: unknown } | undefined)?.standby === 'off'
          const meta = parseMeta(off ? { ...(p.meta as object), standby: undefined } : p.meta)
          const next: VmSpotMeta = { ...state.vms[p.vm], ...meta }
          if (off) {
            delete next.standby
            delete next.standbyRateBps
          }
          state.vms[p.vm] = next
          await persist()
          // Start (or stop) its standby sync now rather than at the next check.
          void reconcile().catch(() => {})
          return { vm: p.vm, ...state.vms[p.vm] }
        },
        'spot.vms': async () => ({ vms: state.vms, standbys: standbyView(), held: Object.fromEntries(held) }),
        'spot.status': async () => ({
          ...(init.watcher === undefined ? {} : { source: init.watcher.describe }),
          ...(notice === undefined ? {} : { notice }),
          draining: state.draining,
          evacuating: running !== undefined,
          capacity: await capacity(),
          vms: state.vms,
          ...(lastReport === undefined ? {} : { lastEvacuation: lastReport }),
        }),
      } satisfies ControlHandlers<'evacuate' | 'drain' | 'spot.set' | 'spot.vms' | 'spot.status'>
    },
    status() {
      return {
        ...(init.watcher === undefined ? {} : { source: init.watcher.describe }),
        draining: state.draining,
        ...(notice === undefined ? {} : { notice: { kind: notice.kind, detail: notice.detail } }),
        evacuating: running !== undefined,
        labels,
        offered: init.offered,
        ...(lastReport === undefined ? {} : { lastEvacuation: lastReport }),
      }
    },
  }
}
