/**
 * The mesh node as the agent sees it: one object that owns this host's identity, its membership in one
 * network, the libp2p control plane and one data-plane Link per member (the Overlay).
 */

import type { Logger } from '../src/base/log.ts'
import type { BulkPath, Link, LinkState, Overlay, PathType } from './link/interfaces.ts'
import type { NetworkKey } from './membership/network.ts'
import type { CongestionStatus } from './node/congestion.ts'
import type { GossipStats } from './node/interfaces.ts'
import type { IceServer, Signaling } from './webrtc/interfaces.ts'
import type { WebRtcLinkOptions } from './webrtc/link.ts'

export type { IceServer, Signaling } from './webrtc/interfaces.ts'

/** Builds one data-plane link over a signaling channel. Exactly one end of a pair is the initiator. */
export type LinkFactory = (init: {
  peer: string
  initiator: boolean
  signaling: Signaling
  iceServers: IceServer[]
  signal: AbortSignal
}) => Promise<Link & { readonly rttMs?: number }>

export type MemberState = 'up' | 'down' | 'dropped' | 'idle'

export interface MemberStatus {
  readonly peerId: string
  readonly name: string
  readonly self: boolean
  /** up: reachable (libp2p connection or open link); down: not now; dropped: gone past the grace period
   *  (no longer redialed; it comes back up by connecting to us); idle: outside this node's warm set and
   *  no link wanted, so not watched from here (Overlay.connect builds a link when one is needed). */
  readonly state: MemberState
  readonly link: LinkState | 'none'
  readonly path?: PathType
  /** The bulk channels ride a libp2p connection to this address (not the WebRTC link). */
  readonly direct?: string
  /** How that connection reaches the member: dialled, hole-punched, or relayed through a bootstrap. */
  readonly bulk?: BulkPath
  /** Last round-trip time measured (link heartbeat if the link reports it, else libp2p ping), in ms. */
  readonly rttMs?: number
  /** Unix ms of the last time the member was seen up. */
  readonly lastSeen?: number
  readonly addedBy: string
  readonly addedAt: number
  /** The libp2p connection to it is relayed (circuit-relay-v2) rather than direct. */
  readonly relayed?: boolean
}

export interface MeshNodeEvents {
  'member-up': { peer: string }
  'member-down': { peer: string }
  'member-dropped': { peer: string }
  'members-changed': { members: number }
  'link-up': { peer: string; path: PathType }
  'link-down': { peer: string; reason?: string }
  /** The link's bulk channels (chunks, migrate) moved to a direct libp2p connection. */
  'link-direct': { peer: string; remote: string }
  /** A stream or connection was refused (non-member, revoked, bad invite). */
  refused: { peer: string; protocol: string; code: string; reason: string }
  /** This node itself has been revoked: all its links and connections are closed (the agent should
   *  tell the operator and exit). */
  'self-revoked': { network: string }
  /** A peer was admitted by this node. */
  admitted: { peer: string; name: string }
}

export interface MeshNodeTiming {
  /** A down member is dropped after this long (default 10 min). */
  memberGraceMs?: number
  /** Cap of the link/connection rebuild backoff (default 3000 ms). */
  reconnectMaxMs?: number
  /** Supervision tick: redial, reservation and gossip checks (default 1000 ms). */
  tickMs?: number
  /** Non-members that connect are disconnected after this long without being admitted (default 15 s). */
  admissionWindowMs?: number
  /** A link attempt (signaling + connect) that has not produced a link by then is abandoned and
   *  retried (default 45 s; the WebRTC link gives up by itself after 30 s). */
  linkAttemptTimeoutMs?: number
  /** Timeout of one admission or member-set exchange (default 10 s). */
  requestTimeoutMs?: number
  /** After the relay said a member has no reservation, its link is retried when a connection to it
   *  opens, or after this long (default 5 s). */
  reservationWaitMs?: number
}

export interface MeshNodeInit {
  /** Holds identity.key and network.json. */
  stateDir: string
  /** This member's display name (letters, digits, . _ -). */
  name: string
  /** libp2p listen multiaddrs (default /ip4/0.0.0.0/tcp/0). */
  listen?: string[]
  /** Addresses to advertise instead of the listen addresses (e.g. a public IP). */
  announce?: string[]
  /** Bootstrap multiaddrs (with /p2p/PEERID). Invites add theirs. */
  bootstrap?: string[]
  /** Run as a bootstrap: serve circuit-relay-v2 (hop) to members. */
  bootstrapRole?: { relay: boolean; stunPort?: number }
  /** The network secret key: the creator's node holds it; it admits itself and can invite and revoke. */
  networkKey?: NetworkKey
  /** Join with this invite on start() when the state dir has no network yet. */
  invite?: string
  iceServers?: IceServer[]
  /** Extra options for the default werift link factory (ICE addresses, port range, timeouts). */
  webrtc?: Omit<WebRtcLinkOptions, 'peer' | 'initiator' | 'signaling' | 'iceServers' | 'signal'>
  /** Data-plane link factory (default: werift WebRTC with `webrtc` options). */
  linkFactory?: LinkFactory
  /** Move links' bulk channels (chunks, migrate) onto a TCP libp2p connection (default true): a direct
   *  dial when either end can dial the other, else a TCP hole punch through two port-keeping NATs,
   *  else the relayed connection through a bootstrap; the WebRTC link always carries control and
   *  tunnel. */
  direct?: boolean
  /** STUN-over-TCP servers for the hole punch (default: every bootstrap's address, port 3478). */
  stunServers?: { address: string; port: number }[]
  /** Carry bulk channels over the bootstrap's relay when nothing direct works (default true). */
  relayBulk?: boolean
  /** TCP congestion control for the control plane's sockets (default 'bbr'; false: kernel default). */
  tcpCongestion?: string | false
  /** Add a libp2p pnet pre-shared key derived from the network's public key (default false). */
  pnet?: boolean
  timing?: MeshNodeTiming
  /** Which members keep a link: `warm` ring neighbours always (default 8: meshes of up to 9 members are
   *  a full mesh), anyone else on demand (Overlay.connect), closed after `idleMs` without traffic or
   *  demand (default 120 s). */
  links?: { warm?: number; idleMs?: number }
  /** Aborting it stops the node. */
  signal?: AbortSignal
  log?: Logger
}

export interface MeshNode {
  /** This node's PeerId (available after start() or join()). */
  readonly peerId: string
  readonly overlay: Overlay
  readonly networkId: string | undefined
  readonly networkName: string | undefined
  start(): Promise<void>
  stop(): Promise<void>
  /** Admission with an invite, over a libp2p stream to one of its bootstrap addresses. Call while stopped
   *  (start() calls it for init.invite). Persists the network and member set in the state dir. */
  join(invite: string, options?: { signal?: AbortSignal }): Promise<void>
  /** Makes an invite (needs init.networkKey). Bootstrap addresses default to this node's. */
  invite(options: { ttlMs: number; bind?: string; bootstrap?: string[] }): Promise<string>
  /** Revokes a member everywhere (needs init.networkKey). */
  revoke(peer: string): Promise<void>
  members(options?: { includeDropped?: boolean }): MemberStatus[]
  /** Throughput of a plain libp2p stream (tcp + noise + yamux) to the peer: the baseline the overlay
   *  link is compared with. Uses the direct connection when there is one, else the relayed one. */
  benchStream(
    peer: string,
    bytes: number,
    options?: { signal?: AbortSignal },
  ): Promise<{ bytes: number; seconds: number; mbps: number; remote: string; direct: boolean }>
  /** libp2p ping round trip in ms. */
  ping(peer: string, options?: { signal?: AbortSignal }): Promise<number>
  /** The multiaddrs this node can be reached on (including relay circuits). */
  addresses(): string[]
  /** TCP congestion control on the control plane's sockets: wanted, kernel default, applied/failed. */
  congestion(): CongestionStatus
  /** Member-set gossip since start: messages and bytes, both directions. */
  gossipStats(): GossipStats
  on<E extends keyof MeshNodeEvents>(event: E, handler: (detail: MeshNodeEvents[E]) => void): () => void
}
