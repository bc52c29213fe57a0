/**
 * Contracts between the parts of a mesh node (net/node.ts composes them):
 *
 *   state.ts       MemberStateStore  the network and its member set, kept in STATE/network.json
 *   libp2p.ts      createControlPlane  the one libp2p configuration (member node and admission dialer)
 *   gate.ts        MemberGate        nothing but members gets a stream, a reservation or a relay slot
 *   admission.ts   Admission         join with an invite, admit others, make invites, revoke
 *   gossip.ts      Gossip            member-set push-pull, address hints, reacting to set changes
 *   supervisor.ts  LinkSupervisor    one data-plane link per member: build, watch, rebuild; liveness
 *
 * Each part gets a NodeContext (what every part sees of the running node) and the other parts it needs
 * as injected functions, so each can be built and tested on its own.
 */
import type { Connection, ConnectionGater, Stream, StreamHandler } from '@libp2p/interface'
import type { Libp2p } from 'libp2p'
import type { Logger } from '../../src/base/log.ts'
import type { MemberState, MeshNodeEvents, MeshNodeTiming } from '../interfaces.ts'
import type { Link, Overlay } from '../link/interfaces.ts'
import type { NetworkInfo, SignedRecord } from '../membership/interfaces.ts'
import type { MemberSet } from '../membership/member-set.ts'

/** What every part of the node sees of it. */
export interface NodeContext {
  /** This node's PeerId ('' until its identity is loaded). */
  readonly self: string
  /** The running control plane (undefined while stopped). */
  readonly libp2p: Libp2p | undefined
  /** Aborted when the node stops; undefined while stopped. Bounds every background operation. */
  readonly lifetime: AbortSignal | undefined
  readonly state: MemberStateStore
  readonly timing: Required<MeshNodeTiming>
  readonly log: Logger
  emit<E extends keyof MeshNodeEvents>(event: E, detail: MeshNodeEvents[E]): void
  /** This node's own multiaddrs (including relay circuits). */
  addresses(): string[]
}

/** The network this node is in and its member set, as saved in STATE/network.json. */
export interface MemberStateStore {
  readonly network: NetworkInfo | undefined
  readonly set: MemberSet | undefined
  /** Bootstrap multiaddrs: the node's init, then every invite's, then what the state file holds. */
  readonly bootstrap: readonly string[]
  /** Loads the state file if there is one (replacing what is held). Throws MembershipError if corrupt. */
  load(): Promise<void>
  /** Takes a network and its member set (admission, or the key holder's first start). */
  adopt(network: NetworkInfo, set: MemberSet): void
  addBootstrap(addrs: readonly string[]): void
  isMember(peer: string): boolean
  isRevoked(peer: string): boolean
  /** Saves (serialised, atomic, owner-only). A failure is logged and rethrown to this caller only. */
  persist(): Promise<void>
  /** Resolves once every save started so far has finished. */
  settled(): Promise<void>
}

export interface MemberGate {
  /** libp2p's connection gater: revoked peers are not dialled; relay slots are for members only. */
  connectionGater(): ConnectionGater
  /** Wraps a protocol handler: a non-member's stream is refused before a byte is read. */
  guard(protocol: string, handler: (stream: Stream, conn: Connection) => Promise<void>): StreamHandler
  /** Puts the same check in front of the protocols libp2p registers itself (identify, ping). */
  guardBuiltins(node: Libp2p, skip: readonly string[]): Promise<void>
  /** True for a current member; asks an unknown peer for the records about itself first. */
  ensureMember(peer: string): Promise<boolean>
  /** Logs and emits a refusal. */
  refuse(peer: string, protocol: string, err: Error): void
  /** A stranger's connection gets admissionWindowMs to become a member, then it is closed. */
  admissionWindow(conn: Connection): void
}

export interface Admission {
  /** Presents an invite to one of its bootstraps (through a dial-only libp2p node); persists the set. */
  join(invite: string, signal: AbortSignal | undefined): Promise<void>
  /** The network key's holder admits itself with a short invite bound to itself. */
  admitSelf(): Promise<void>
  /** The `/mesh/admit/1` handler (the one protocol a non-member may open). */
  handle(stream: Stream, conn: Connection): Promise<void>
  invite(options: { ttlMs: number; bind?: string; bootstrap?: string[] }): Promise<string>
  revoke(peer: string): Promise<void>
}

export interface Gossip {
  /** Push-pull with one peer: send what we have (unless pulling `self`), merge what comes back. A
   *  `notice` is one-way (to a revoked peer). */
  exchange(
    peer: string,
    want: 'all' | 'self',
    options: { signal: AbortSignal; notice?: boolean },
  ): Promise<void>
  /** Reconciles with one member (`/mesh/members/2`): pushes `delta`, then only what differs. */
  sync(peer: string, delta: readonly SignedRecord[], options: { signal: AbortSignal }): Promise<void>
  /** The `/mesh/members/1` handler. */
  handle(stream: Stream, conn: Connection): Promise<void>
  /** The `/mesh/members/2` handler. */
  handleSync(stream: Stream, conn: Connection): Promise<void>
  /** After any change to the set: save, enforce revocations, push what changed (`added`) to the
   *  connected members this node pushes to. */
  changed(source: string | undefined, added?: readonly SignedRecord[]): void
  /** Addresses a member advertised. */
  hints(peer: string): readonly string[]
  /** Records about `peer` only: what `want: 'self'` returns. */
  recordsAbout(peer: string): SignedRecord[]
  /** True once this node learned it was revoked. */
  readonly selfRevoked: boolean
  /** Member-set messages and their bytes since start (both directions). */
  stats(): GossipStats
}

export interface GossipStats {
  sent: number
  received: number
  bytesOut: number
  bytesIn: number
}

/** What the supervisor knows of one member. */
export interface PeerStatus {
  readonly state: MemberState
  readonly lastSeen: number
  readonly link: (Link & { readonly rttMs?: number }) | undefined
  readonly connecting: boolean
  readonly rttMs: number | undefined
}

export interface LinkSupervisor {
  readonly overlay: Overlay
  /** Starts the supervision tick (redial, liveness, reservations, anti-entropy). */
  start(): void
  /** Stops ticking and closes every link and attempt. */
  stop(): void
  /** Makes sure every current member (but us) is supervised. */
  trackMembers(): void
  /** Forgets the peers `drop` selects, closing their links (reason: revoked). Returns them. */
  dropPeers(drop: (peer: string) => boolean, reason: (peer: string) => Error): string[]
  /** Re-evaluates a member's up/down state now (a connection opened or closed). */
  observe(peer: string): void
  /** This node keeps (or is building) a link to the member: a warm ring neighbour, or one wanted now. */
  keeps(peer: string): boolean
  status(peer: string): PeerStatus | undefined
  setRtt(peer: string, rttMs: number): void
  /** The `/mesh/signal/1` handler: the peer (the pair's initiator) starts a link attempt. */
  handleSignal(stream: Stream, conn: Connection): Promise<void>
  /** Opens a stream to a member, teaching the peer store its hinted and relay addresses first. */
  dialMember(peer: string, protocol: string, signal: AbortSignal): Promise<Stream>
  addDialAddrs(peer: string): Promise<void>
  dialBootstrap(addr: string): Promise<void>
}
