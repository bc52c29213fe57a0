/**
 * The VM directory as an agent service (net/directory): which member runs which VM, asked live.
 * Control API: `vm.where` ({ vm }) → where it runs ({ here } or the member), `vm.ls-all` → every member's
 * VMs, this host's first.
 */
import { createDirectory, type Directory, type VmEntry } from '../../../net/directory/directory.ts'
import type { MeshNode } from '../../../net/interfaces.ts'
import type { VmInfo } from '../../../vm/manager.ts'
import { MeshError, UsageError } from '../../base/errors.ts'
import type { Logger } from '../../base/log.ts'
import type { ControlHandlers } from '../../control/api.ts'
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

export interface DirectoryService extends AgentService {
  handlers(): ControlHandlers<'vm.where' | 'vm.ls-all'>
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

export function createDirectoryService(init: {
  node: MeshNode
  local(): Promise<VmInfo[]>
  log: Logger
}): DirectoryService {
  let dir: Directory | undefined
  const memberName = (peer: string) => init.node.members().find((m) => m.peerId === peer)?.name ?? peer
  const local = async () => (await init.local()).map(toEntry)

  const where = async (vm: string, signal?: AbortSignal): Promise<VmLocation | undefined> => {
    const mine = (await local()).find((v) => v.name === vm && v.status !== 'exited')
    const self = init.node.peerId
    if (mine !== undefined) return { vm, here: true, peer: self, member: memberName(self), entry: mine }
    const found = await dir?.find(vm, signal === undefined ? {} : { signal })
    if (found === undefined) return undefined
    return { vm, here: false, peer: found.peer, member: memberName(found.peer), entry: found.vm }
  }

  const all = async (signal?: AbortSignal): Promise<MemberVms[]> => {
    const self = init.node.peerId
    const others = (await dir?.list(signal === undefined ? {} : { signal })) ?? []
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
      dir = createDirectory({ overlay: init.node.overlay, local, log: init.log })
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
      }) satisfies ControlHandlers<'vm.where' | 'vm.ls-all'>,
  }
}
