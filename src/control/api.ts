/**
 * The agent's control API as types: one entry per method the agent serves on its control socket,
 * `{ params; result; event }` (event: what the method streams to `onEvent` while it runs; `never` when
 * it streams nothing). The client (`client.ts`) types `call()` from it, the services check their
 * handlers against it (`satisfies ControlHandlers<…>`), and the rows the CLI prints are defined here
 * once. Types only, apart from CONTROL_METHODS (the names, for tests): the wire format is v1/messages.ts.
 *
 * A new method: add its entry here and to CONTROL_METHODS (the compiler insists), serve it from a
 * service's handlers() with `satisfies ControlHandlers<'name'>`; test/unit/control-api.test.ts fails
 * when a service serves a name this map lacks. Params are what the client sends; handlers still get
 * `unknown` and check it (the socket is the trust boundary).
 */
import type { ImageProgress, ImageRecord } from '../../net/chunks/images.ts'
import type { MemberStatus } from '../../net/interfaces.ts'
import type { BulkPath, PathType } from '../../net/link/interfaces.ts'
import type { CongestionStatus } from '../../net/node/congestion.ts'
import type { GossipStats } from '../../net/node/interfaces.ts'
import type { SwitchStatus } from '../../net/tunnel/interfaces.ts'
import type { VmInfo } from '../../vm/manager.ts'
import type { MigrationProgress, MigrationReport } from '../../vm/migration/interfaces.ts'
import type { VmSpec } from '../../vm/spec.ts'
import type { MemberVms, RemoteVmResult, VmLocation } from '../agent/services/directory.ts'
import type { MigrateParams, RecoverResult, TokenHistoryRow } from '../agent/services/migration.ts'
import type { ExposeInfo, ExposeParams } from '../agent/services/tunnel.ts'
import type {
  CapacityReport,
  EvacuationEvent,
  EvacuationReport,
  VmSpotMeta,
} from '../agent/spot/interfaces.ts'
import type { Notice } from '../agent/spot/notice.ts'
import type { StandbyStatus, SyncResult } from '../agent/spot/standby.ts'
import type { HandlerContext } from './server.ts'

export type { ExposeInfo, ImageProgress, ImageRecord, MemberVms, RecoverResult, TokenHistoryRow, VmLocation }

/** One member as `mesh peers` shows it (the `peers` method's rows; field types follow MemberStatus). */
export interface PeerRow {
  id: string
  name: string
  state: MemberStatus['state']
  link: MemberStatus['link']
  path?: PathType
  /** Bulk channels ride a TCP connection to this address. */
  direct?: string
  /** How: 'tcp' (dialled), 'tcp-punch' (hole-punched through both NATs), 'tcp-relay' (via a bootstrap). */
  bulk?: BulkPath
  rttMs?: number
  /** The libp2p connection to it is relayed (circuit-relay-v2). */
  relayed?: boolean
}

/** The net service's part of `status` (a type, not an interface: services' status() is a Record). */
export type NetStatus = {
  peerId: string
  name: string
  network: { id: string | undefined; name: string | undefined }
  members: number
  linksOpen: number
  listen: string[]
  tcpCongestion: CongestionStatus
  gossip: GossipStats
}

/** `status`: the agent, and each started service's summary under its name. */
export interface AgentStatus {
  pid: number
  uptimeMs: number
  stateDir: string
  net?: NetStatus
  web?: { listen?: string }
  metrics?: { listen?: string }
  [service: string]: unknown
}

export interface PingEvent {
  seq: number
  rttMs: number
  path?: PathType
}

interface BenchCommon {
  peer: string
  peerId: string
  bytes: number
  seconds: number
  /** MB/s (10^6 bytes per second). */
  mbps: number
}

/** `bench`: over the overlay link (its control channel), or a plain libp2p stream (the baseline). */
export type BenchRow =
  | (BenchCommon & { over: 'link'; path?: PathType; direct?: string; bulk?: BulkPath })
  | (BenchCommon & { over: 'libp2p'; remote: string; direct: boolean; path: 'direct-tcp' | 'relayed' })

export interface ImagePullResult {
  record: ImageRecord
  bytesFetched: number
  bytesSkipped: number
  elapsedMs: number
  from: string[]
}

/** A standby sync as `spot.vms` reports it (lagMs: since its last complete pass). */
export type StandbyRow = StandbyStatus & { lagMs?: number }

export interface SpotVms {
  vms: Record<string, VmSpotMeta>
  standbys: Record<string, StandbyRow>
  /** Standbys this host holds for VMs elsewhere. */
  held: Record<string, { from: string; syncedAt: number; last: SyncResult }>
}

export interface SpotStatus {
  source?: string
  notice?: Notice
  draining: boolean
  evacuating: boolean
  capacity: CapacityReport
  vms: Record<string, VmSpotMeta>
  lastEvacuation?: EvacuationReport
}

export interface EvacuateParams {
  /** Only to this member (name or PeerId). */
  to?: string
  deadlineMs?: number
}

/** Every method the agent serves, by name. */
export interface ControlApi {
  // the agent itself (src/agent/agent.ts)
  status: { params: Record<string, never>; result: AgentStatus; event: never }
  'agent.stop': { params: Record<string, never>; result: { stopping: true }; event: never }
  // net (src/agent/net-service.ts)
  peers: { params: Record<string, never>; result: { peers: PeerRow[] }; event: never }
  ping: {
    params: { peer: string; count?: number }
    result: { peer: string; peerId: string; rttMs: number[] }
    event: PingEvent
  }
  bench: {
    params: { peer: string; bytes?: number; over?: 'link' | 'libp2p' }
    result: BenchRow
    event: never
  }
  invite: {
    params: { ttlMs?: number; bind?: string; bootstrap?: string[] }
    result: { invite: string }
    event: never
  }
  revoke: { params: { peer: string }; result: { revoked: string; name: string }; event: never }
  // chunks and images (src/agent/services/chunks.ts → net/chunks/images.ts)
  'image.push': { params: { files: string[]; ref: string }; result: ImageRecord; event: ImageProgress }
  'image.pull': { params: { ref: string; dir?: string }; result: ImagePullResult; event: ImageProgress }
  'image.ls': { params: Record<string, never>; result: { images: ImageRecord[] }; event: never }
  'image.rm': { params: { ref: string }; result: { removed: boolean }; event: never }
  // VMs (src/agent/services/vm.ts)
  'vm.run': { params: { spec: VmSpec }; result: VmInfo; event: never }
  'vm.ls': { params: Record<string, never>; result: { vms: VmInfo[] }; event: never }
  'vm.stop': { params: { name: string }; result: VmInfo; event: never }
  'vm.console': { params: { name: string; lines?: number }; result: { lines: string[] }; event: never }
  // the VM directory (src/agent/services/directory.ts)
  'vm.where': { params: { vm: string }; result: VmLocation; event: never }
  'vm.ls-all': { params: Record<string, never>; result: { members: MemberVms[] }; event: never }
  'vm.stop-remote': { params: { vm: string }; result: RemoteVmResult; event: never }
  'vm.console-remote': { params: { vm: string; lines?: number }; result: RemoteVmResult; event: never }
  /** spot.set on the member that runs the VM. */
  'vm.set-remote': { params: { vm: string; meta: VmSpotMeta }; result: RemoteVmResult; event: never }
  // migration and fencing (src/agent/services/migration.ts)
  migrate: { params: MigrateParams; result: MigrationReport; event: MigrationProgress }
  'vm.tokens': { params: { vm: string }; result: { vm: string; members: TokenHistoryRow[] }; event: never }
  'vm.recover': { params: { vm: string; acceptLoss?: boolean }; result: RecoverResult; event: never }
  // the L2 tunnel and exposures (src/agent/services/tunnel.ts)
  expose: { params: ExposeParams; result: ExposeInfo; event: never }
  unexpose: { params: { listen: string }; result: { removed: boolean }; event: never }
  'expose.list': { params: Record<string, never>; result: ExposeInfo[]; event: never }
  'tunnel.status': { params: Record<string, never>; result: SwitchStatus; event: never }
  // spot instances (src/agent/spot/service.ts)
  evacuate: { params: EvacuateParams; result: EvacuationReport; event: EvacuationEvent }
  drain: {
    params: EvacuateParams & { off?: boolean }
    result: EvacuationReport | { draining: false }
    event: EvacuationEvent
  }
  'spot.set': {
    /** meta.standby 'off' ends the VM's standby. */
    params: { vm: string; meta: VmSpotMeta }
    result: VmSpotMeta & { vm: string }
    event: never
  }
  'spot.vms': { params: Record<string, never>; result: SpotVms; event: never }
  'spot.status': { params: Record<string, never>; result: SpotStatus; event: never }
}

export type ControlMethod = keyof ControlApi
export type ControlParams<M extends ControlMethod> = ControlApi[M]['params']
export type ControlResult<M extends ControlMethod> = ControlApi[M]['result']
export type ControlEvent<M extends ControlMethod> = ControlApi[M]['event']

/** Every method name at run time (tests compare it with what the services serve). The mapped type makes
 *  the compiler reject a missing or an extra name. */
const METHODS: { readonly [M in ControlMethod]: true } = {
  status: true,
  'agent.stop': true,
  peers: true,
  ping: true,
  bench: true,
  invite: true,
  revoke: true,
  'image.push': true,
  'image.pull': true,
  'image.ls': true,
  'image.rm': true,
  'vm.run': true,
  'vm.ls': true,
  'vm.stop': true,
  'vm.console': true,
  'vm.where': true,
  'vm.ls-all': true,
  'vm.stop-remote': true,
  'vm.console-remote': true,
  'vm.set-remote': true,
  migrate: true,
  'vm.tokens': true,
  'vm.recover': true,
  expose: true,
  unexpose: true,
  'expose.list': true,
  'tunnel.status': true,
  evacuate: true,
  drain: true,
  'spot.set': true,
  'spot.vms': true,
  'spot.status': true,
}
export const CONTROL_METHODS: readonly ControlMethod[] = Object.keys(METHODS) as ControlMethod[]

/** The server side of one method: params arrive unchecked (`unknown`), the result is typed. */
export type ControlHandler<M extends ControlMethod> = (
  params: unknown,
  ctx: HandlerContext<ControlEvent<M>>,
) => Promise<ControlResult<M>>

/** A service's handlers for the methods M, e.g. `{…} satisfies ControlHandlers<'peers' | 'ping'>`. */
export type ControlHandlers<M extends ControlMethod = ControlMethod> = { [K in M]: ControlHandler<K> }
