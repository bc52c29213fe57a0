/**
 * The VM directory as an agent service (net/directory): which member runs which VM, asked live.
 * Control API: `vm.where` ({ vm }) → where it runs ({ here } or the member), `vm.ls-all` → every member's
 * VMs, this host's first; `vm.stop-remote` / `vm.console-remote` ({ vm }) act on the member that runs
 * the VM now, through an agent call to it (`vm.stop` / `vm.console`, which this service serves for the
 * VMs of this host). `vm.set-remote` ({ vm, meta }) changes a VM's spot settings (standby, priority) on
 * the member that runs it (agent call `vm.set`, served with this host's `spot.set`).
 */
import { createDirectory, type Directory, type VmEntry } from '../../../net/directory/directory.ts'
import type { MeshNode } from '../../../net/interfaces.ts'
import type { VmControl, VmInfo } from '../../../vm/manager.ts'
import { MeshError, UsageError } from '../../base/errors.ts'
import type { Logger } from '../../base/log.ts'
import type { ControlHandlers, ControlResult } from '../../control/api.ts'
import type { AgentCalls } from '../calls/calls.ts'
import type { AgentService } from '../interfaces.ts'

export class VmNotInMeshError extends MeshError {
  constructor(vm: string) {
    super(`no member runs a VM named '${vm}' (see 'mesh vm ls --all')`, { code: 'E_VM_NOT_FOUND' })
  }
}

export interface VmLocation {
  vm: string
  here: boolean
  /** The member's PeerId and name (this node's when here). */
  peer: string
  member: string
  entry: VmEntry
}

type Methods = 'vm.where' | 'vm.ls-all' | 'vm.stop-remote' | 'vm.console-remote' | 'vm.set-remote'

/** A VM's spot settings as `spot.set` answers them. */
export type SpotSetResult = ControlResult<'spot.set'>

/** What `vm.stop-remote` / `vm.console-remote` did, and on which member. */
export interface RemoteVmResult {
  vm: string
  peer: string
  member: string
  here: boolean
  /** vm.stop-remote: the VM as its host reports it after the stop. */
  info?: VmInfo
  /** vm.console-remote: the last lines of its serial console. */
  lines?: string[]
  /** vm.set-remote: the VM's spot settings on its host after the change. */
  spot?: SpotSetResult
}

export interface DirectoryService extends AgentService {
  handlers(): ControlHandlers<Methods>
  /** Where a VM runs now: this host first, else the member that answers with it running. */
  where(vm: string, signal?: AbortSignal): Promise<VmLocation | undefined>
  /** Every member's VMs, this host's first. */
  all(signal?: AbortSignal): Promise<MemberVms[]>
}

export interface MemberVms {
  peer: string
  member: string
  self: boolean
  vms: VmEntry[]
  /** The member did not answer (its VMs are unknown). */
  error?: string
  /** Its clock minus ours (ms), from its answer. */
  skewMs?: number
  rttMs?: number
}

export function toEntry(v: VmInfo): VmEntry {
  return {
    name: v.name,
    status: v.status,
    ...(v.ip === undefined ? {} : { ip: v.ip }),
    mac: v.mac,
    memoryMiB: v.memoryMiB,
    vcpus: v.vcpus,
  }
}

const vmParam = (p: unknown): string => {
  const vm = (p as { vm?: unknown } | null)?.vm
  if (typeof vm !== 'string' || vm === '') throw new UsageError('vm: a VM name is required')
  return vm
}

/** A stop waits for QEMU to quit on the other member (it may be loaded). */
const REMOTE_STOP_TIMEOUT_MS = 60_000
const REMOTE_CONSOLE_TIMEOUT_MS = 15_000
const REMOTE_SET_TIMEOUT_MS = 15_000

const linesParam = (p: unknown): number => {
  const n = (p as { lines?: unknown } | null)?.lines
  if (n === undefined) return 50
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > 10_000)
    throw new UsageError('lines: a whole number from 1 to 10000')
  return n
}

export function createDirectoryService(init: {
  node: MeshNode
  local(): Promise<VmInfo[]>
  /** This host's VMs, for members' `vm.stop` / `vm.console` calls (absent: not served here). */
  vms?: Pick<VmControl, 'stop' | 'console'>
  /** Agent calls to other members (a getter: created after this service). */
  calls?: () => AgentCalls
  /** This host's `spot.set` (its spot service), for `vm.set-remote` and members' `vm.set` calls. */
  spotSet?: (params: { vm: string; meta: unknown }) => Promise<SpotSetResult>
  log: Logger
}): DirectoryService {
  let dir: Directory | undefined
  let registered = false
  let registeredSet = false
  const memberName = (peer: string) => init.node.members().find((m) => m.peerId === peer)?.name ?? peer
  const local = async () => (await init.local()).map(toEntry)
  const runsHere = async (vm: string) =>
    (await init.local()).some((v) => v.name === vm && v.status !== 'exited')

  const where = async (vm: string, signal?: AbortSignal): Promise<VmLocation | undefined> => {
    const mine = (await local()).find((v) => v.name === vm && v.status !== 'exited')
    const self = init.node.peerId
    if (mine !== undefined) return { vm, here: true, peer: self, member: memberName(self), entry: mine }
    const found = await dir?.find(vm, signal === undefined ? {} : { signal })
    if (found === undefined) return undefined
    return { vm, here: false, peer: found.peer, member: memberName(found.peer), entry: found.vm }
  }

  /**
   * Runs `op` on the member that runs the VM now: here, or through an agent call to it. A VM that moved
   * between the question and the call is looked up once more (names follow a VM that moves).
   */
  const onHost = async <T>(
    vm: string,
    signal: AbortSignal,
    local: () => Promise<T>,
    remote: (calls: AgentCalls, peer: string) => Promise<T>,
  ): Promise<{ loc: VmLocation; result: T }> => {
    for (let attempt = 1; ; attempt++) {
      const loc = await where(vm, signal)
      if (loc === undefined) throw new VmNotInMeshError(vm)
      try {
        if (loc.here) return { loc, result: await local() }
        if (init.calls === undefined)
          throw new MeshError('agent calls are not available', { code: 'E_NO_CALLS' })
        return { loc, result: await remote(init.calls(), loc.peer) }
      } catch (err) {
        if (attempt < 2 && err instanceof MeshError && err.code === 'E_VM_NOT_FOUND') continue
        throw err
      }
    }
  }

  const all = async (signal?: AbortSignal): Promise<MemberVms[]> => {
    const self = init.node.peerId
    const others =
      (await dir?.list(signal === undefined ? { everyone: true } : { signal, everyone: true })) ?? []
    return [
      { peer: self, member: memberName(self), self: true, vms: await local() },
      ...others.map((o) => ({ ...o, member: memberName(o.peer), self: false })),
    ]
  }

  return {
    name: 'directory',
    where,
    all,
    async start() {
      dir = createDirectory({
        overlay: init.node.overlay,
        local,
        // Members that are down would only cost a link timeout each.
        members: () =>
          init.node
            .members()
            .filter((m) => !m.self && m.state !== 'down')
            .map((m) => m.peerId),
        log: init.log,
      })
      const vms = init.vms
      if (vms !== undefined && init.calls !== undefined && !registered) {
        registered = true
        // Members act on the VMs of this host by name (links exist only between members).
        init.calls().register({
          'vm.stop': async (p) => vms.stop(vmParam(p)),
          'vm.console': async (p) => ({ lines: await vms.console(vmParam(p), linesParam(p)) }),
        })
      }
      const spotSet = init.spotSet
      if (spotSet !== undefined && init.calls !== undefined && !registeredSet) {
        registeredSet = true
        init.calls().register({
          // Only for a VM this host runs: a VM that moved away meanwhile is looked up again by the caller.
          'vm.set': async (p) => {
            const vm = vmParam(p)
            if (!(await runsHere(vm))) throw new VmNotInMeshError(vm)
            return spotSet({ vm, meta: (p as { meta?: unknown }).meta })
          },
        })
      }
    },
    async stop() {
      dir?.stop()
      dir = undefined
    },
    handlers: () =>
      ({
        'vm.where': async (p, ctx) => {
          const vm = vmParam(p)
          const loc = await where(vm, ctx.signal)
          if (loc === undefined) throw new VmNotInMeshError(vm)
          return loc
        },
        'vm.ls-all': async (_p, ctx) => ({ members: await all(ctx.signal) }),
        'vm.stop-remote': async (p, ctx) => {
          const vm = vmParam(p)
          const { loc, result } = await onHost(
            vm,
            ctx.signal,
            () => init.vms?.stop(vm) ?? Promise.reject(new VmNotInMeshError(vm)),
            async (calls, peer) =>
              (await calls.call(
                peer,
                'vm.stop',
                { vm },
                { timeoutMs: REMOTE_STOP_TIMEOUT_MS, signal: ctx.signal },
              )) as VmInfo,
          )
          return { vm, peer: loc.peer, member: loc.member, here: loc.here, info: result }
        },
        'vm.console-remote': async (p, ctx) => {
          const vm = vmParam(p)
          const lines = linesParam(p)
          const { loc, result } = await onHost(
            vm,
            ctx.signal,
            () => init.vms?.console(vm, lines) ?? Promise.reject(new VmNotInMeshError(vm)),
            async (calls, peer) => {
              const r = (await calls.call(
                peer,
                'vm.console',
                { vm, lines },
                { timeoutMs: REMOTE_CONSOLE_TIMEOUT_MS, signal: ctx.signal },
              )) as { lines?: unknown }
              if (!Array.isArray(r?.lines) || !r.lines.every((l) => typeof l === 'string'))
                throw new MeshError(`${peer} answered vm.console without lines`, { code: 'E_BAD_REPLY' })
              return r.lines as string[]
            },
          )
          return { vm, peer: loc.peer, member: loc.member, here: loc.here, lines: result }
        },
        'vm.set-remote': async (p, ctx) => {
          const vm = vmParam(p)
          const meta = (p as { meta?: unknown }).meta
          const spotSet = init.spotSet
          if (spotSet === undefined)
            throw new MeshError('this agent has no spot service', { code: 'E_NO_SPOT' })
          const { loc, result } = await onHost(
            vm,
            ctx.signal,
            () => spotSet({ vm, meta }),
            async (calls, peer) => {
              const r = (await calls.call(
                peer,
                'vm.set',
                { vm, meta },
                { timeoutMs: REMOTE_SET_TIMEOUT_MS, signal: ctx.signal },
              )) as SpotSetResult | null
              if (r === null || typeof r !== 'object' || r.vm !== vm)
                throw new MeshError(`${peer} answered vm.set without the VM's settings`, {
                  code: 'E_BAD_REPLY',
                })
              return r
            },
          )
          return { vm, peer: loc.peer, member: loc.member, here: loc.here, spot: result }
        },
      }) satisfies ControlHandlers<Methods>,
  }
}
