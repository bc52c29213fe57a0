/**
 * The tunnel's contract: one L2 switch per agent joining local ports (each guest NIC through QEMU's
 * `-netdev stream` socket, optionally a host TAP device) and one remote port per member link (the
 * link's unreliable, unordered `'tunnel'` channel). The migration service moves a guest's MAC with
 * detachVm / attachVm / announce.
 */

/**
 * Size budget of one tunnel message. werift's SCTP puts at most 1200 bytes of user data in one DATA
 * chunk (`USERDATA_MAX_LENGTH`); a bigger message is fragmented, and on a channel that never
 * retransmits, losing any fragment loses the whole frame, so frames are sized to travel unfragmented.
 */
export const TUNNEL_MESSAGE_BUDGET = 1200
/** v1 header: version byte + type byte. */
export const TUNNEL_HEADER_BYTES = 2
/** Ethernet header without VLAN tag: dst(6) src(6) ethertype(2). */
export const ETHERNET_HEADER_BYTES = 14
/** Largest Ethernet frame (header + payload, no FCS) the switch forwards. */
export const MAX_FRAME_BYTES = TUNNEL_MESSAGE_BUDGET - TUNNEL_HEADER_BYTES
/**
 * The IP MTU every NIC on the overlay must use (guests get it as `mesh.mtu=`, the host TAP is set to
 * it): 1200 - 2 - 14 = 1184. Larger frames are dropped and counted (`oversize`), never fragmented.
 */
export const TUNNEL_MTU = MAX_FRAME_BYTES - ETHERNET_HEADER_BYTES

/** Per-port counters. */
export interface PortCounters {
  rxFrames: number
  rxBytes: number
  txFrames: number
  txBytes: number
  /** Frames that could not be delivered to this port (queue full, not connected, too large). */
  drops: number
}

export type PortKind = 'vm' | 'tap' | 'remote' | 'local'

export interface PortStatus extends PortCounters {
  id: string
  kind: PortKind
  /** For vm ports: whether the QEMU socket is connected right now. */
  connected?: boolean
  /** vm: the guest MAC; remote: the peer id. */
  detail?: string
}

export interface SwitchStatus {
  ports: PortStatus[]
  macs: number
  /** MACs that moved away from this switch and are still being forwarded (grace period). */
  movedAway: number
  /** Frames held right now: for paused guests here (holdVm) and for moved MACs whose new host is not known yet. */
  held: number
  /** Frames held for paused guests since start (delivered later, or counted as a drop). */
  heldTotal: number
  /** Repeats of MAC announcements still scheduled (each announce() repeats itself a few times). */
  announcesPending: number
  /** Switch-wide drops by reason. */
  drops: Record<string, number>
  mtu: number
}

/**
 * A local device as the switch sees it. The switch calls `send` for every frame to deliver (the
 * driver drops and returns false when its bounded queue is full) and the driver calls the `receive`
 * function it was built with for every frame the device emits.
 */
export interface PortDriver {
  send(frame: Uint8Array): boolean
  close(): Promise<void> | void
  /** Extra status for `mesh status`. */
  connected?(): boolean
}

export type PortFactory = (receive: (frame: Uint8Array) => void) => PortDriver

export interface AttachOptions {
  /** Where the MAC came from (peer id), to forward frames still arriving for it before its announcement. */
  from?: string
  /**
   * The guest does not run yet (a migration's incoming VM): hold the frames that reach this NIC until
   * resumeVm(), instead of writing them into a QEMU that is not reading.
   */
  hold?: boolean
}

export interface DetachOptions {
  /** The peer the VM moves to, when known; otherwise learned from its announcement. */
  to?: string
}

export interface TunnelSwitch {
  readonly self: string
  start(): void
  stop(): Promise<void>
  /**
   * Plugs a guest NIC in: connects to QEMU's stream server socket (and reconnects when it drops).
   * The MAC's location only moves here with announce() (call it once the guest runs here): a migration
   * destination attaches while the guest still runs on the source.
   */
  attachVm(mac: string, socketPath: string, options?: AttachOptions): void
  /**
   * Unplugs a guest NIC (the VM stopped here or moved away). For a grace period, frames that still
   * arrive for the MAC are forwarded to its new location (held in a small bounded queue until the new
   * location's announcement is heard).
   */
  detachVm(mac: string, options?: DetachOptions): Promise<void>
  /**
   * Tells every member that `mac` is here now (repeated a few times: the channel is lossy). `epoch`
   * orders announcements; default: one more than any epoch seen for this MAC, at least Date.now().
   * Returns the epoch used.
   */
  announce(mac: string, epoch?: number): number
  /**
   * The guest behind `mac` stopped running here (paused, e.g. for a migration's switch-over). Frames
   * for it are held by the switch in a bounded queue (see SwitchOptions.holdFrames / holdBytes; when
   * full, newer frames are dropped) instead of being written into QEMU: a paused QEMU does not read its
   * socket, and if the guest moves, whatever sits in that socket dies with the old QEMU, leaving the
   * client's TCP to wait for a retransmission timeout. What is held goes, in order, to the MAC's new
   * host the moment that host announces it, or to the NIC here on resumeVm() (the move rolled back).
   * Idempotent; a no-op for a MAC that is not attached.
   */
  holdVm(mac: string): void
  /** The guest runs here (again): deliver what was held to its NIC, in order, and stop holding. */
  resumeVm(mac: string): void
  /** Adds any local port (the host TAP, tests). Returns a function that removes it. */
  addPort(id: string, kind: PortKind, factory: PortFactory): () => Promise<void>
  /** Where the switch currently sends frames for `mac`: a port id, or undefined when unknown. */
  lookup(mac: string): string | undefined
  status(): SwitchStatus
}
