/**
 * The spot service's contracts: what an agent reports to members for placement, what an evacuation
 * emits and reports. JSON-able throughout (they travel as agent calls and control-API events).
 */
import type { Room } from './placement.ts'

export type { Room }

/** What a member answers to 'spot.capacity': room for VMs, labels, and whether it takes any. */
export interface CapacityReport {
  peer: string
  name: string
  labels: Record<string, string>
  /** Offered to VMs (--capacity, else this machine's size). */
  total: Room
  /** Taken by the VMs here and by reservations for VMs on their way here. */
  used: Room
  free: Room
  vms: number
  draining: boolean
  /** This member is under a spot notice itself (ms since the epoch of its deadline). */
  noticeDeadlineAt?: number
  /** VMs whose warm standby this member holds. */
  standbys: string[]
}

export type VmOutcome = 'moved' | 'failed' | 'no-room' | 'cancelled'

export interface VmEvacuation {
  vm: string
  priority: number
  outcome: VmOutcome
  to?: string
  toName?: string
  /** When it ran on its new host, ms since the evacuation started (the notice's receipt). */
  atMs?: number
  /** When its move began (placement, reservation done), ms since the evacuation started. */
  movingAtMs?: number
  totalMs?: number
  downtimeMs?: number
  wireBytes?: number
  /** Non-zero RAM of the guest; with dedupBytes, how much the destination already held. */
  ramBytes?: number
  dedupBytes?: number
  /** The writable disk (a VM with one): what its overlay held, what went on the wire (after
   *  compression), and what the destination held already (a warm standby's copy, the VM's last stay). */
  diskWrittenBytes?: number
  diskSentBytes?: number
  diskDedupBytes?: number
  switchReason?: string
  /**
   * 'postcopy': the guest ran on its new host before all its memory was there (the host here kept
   * lending the rest; atMs is when the last of it arrived, resumedAtMs when the guest ran there).
   */
  mode?: 'precopy' | 'postcopy'
  resumedAtMs?: number
  /** Post-copy: resume → last owed chunk placed, ms; the guest's page faults on missing memory. */
  postcopyMs?: number
  postcopyFaults?: number
  /** The highest vCPU throttle the move used (0.9: the guest's vCPUs got a tenth of a CPU). */
  throttleMax?: number
  /** By how much the move missed the time the plan gave it, ms (absent: it made it). */
  deadlineMissedByMs?: number
  /** Earlier tries on other members that failed, one line each. */
  tries?: string[]
  /** The move's own per-phase times (MigrationReport.timings), ms. */
  timings?: Record<string, number>
  error?: string
  code?: string
}

export type EvacuationReason = 'notice' | 'evacuate' | 'drain'

export interface EvacuationReport {
  event: 'report'
  reason: EvacuationReason
  host: string
  startedAt: string
  /** The notice's deadline (the host goes away then), when there is one. */
  deadlineAt?: string
  /** Milliseconds from the start the plan aimed to be done by (deadline minus the margin). */
  planMs?: number
  doneMs: number
  /** Every VM runs on another member. */
  complete: boolean
  vms: VmEvacuation[]
}

/** One line of `mesh evacuate --json` (and of the agent's log during a notice). */
export type EvacuationEvent =
  | {
      event: 'notice'
      provider: string
      kind: string
      detail: string
      deadlineAt?: string
      atMs: number
    }
  | {
      event: 'plan'
      atMs: number
      /** ms from the start the plan aims to be done by. */
      planMs?: number
      assignments: { vm: string; to: string; toName: string; why: string[] }[]
      unplaced: { vm: string; reason: string }[]
      members: { name: string; peer: string; answered: boolean; free?: Room; error?: string }[]
      /** Per VM: bytes to send and, when a rate to that member was seen, the time it should take. */
      estimates?: { vm: string; to: string; bytes: number; basis: string; rateBps?: number; ms?: number }[]
      /** Set when the estimate does not fit the time left: said at the notice, not at the deadline. */
      shortfall?: string
    }
  | { event: 'no-room'; vm: string; reason: string; atMs: number }
  /** A move under way will not make the plan's end at the rate it sees (said once per VM, early). */
  | { event: 'shortfall'; vm: string; detail: string; atMs: number }
  | { event: 'moving'; vm: string; to: string; toName: string; deadlineMs?: number; atMs: number }
  | {
      event: 'progress'
      vm: string
      phase: string
      round: number
      wireBytes: number
      ramBytes: number
      dedupBytes: number
      rateBytesPerSec: number
      dirtyRateBytesPerSec: number
      atMs: number
    }
  | ({ event: 'moved'; atMs: number } & VmEvacuation)
  | ({ event: 'failed'; atMs: number } & VmEvacuation)
  | EvacuationReport

/** Per-VM settings kept by the spot service (`mesh vm run --priority/--standby`), moved with the VM. */
export interface VmSpotMeta {
  priority?: number
  /** 'auto' or a member (name or PeerId). */
  standby?: string
  /** Bytes per second the standby sync may use (default 16 MB/s). */
  standbyRateBps?: number
}
