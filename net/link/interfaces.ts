/**
 * The overlay's data-plane contract. Everything above the link layer (chunk exchange, migration,
 * tunnel) sees only these types, so it runs unchanged over the in-memory implementation (unit tests)
 * and over WebRTC data channels (werift) or any later carrier.
 */

/** The fixed set of channels every link carries. Pre-negotiated: both sides know them by name. */
export type ChannelName = 'control' | 'chunks' | 'migrate' | 'tunnel'

export interface ChannelSpec {
  /** Stable numeric id (the SCTP stream id for pre-negotiated WebRTC data channels). */
  readonly id: number
  /** Reliable channels deliver every message, in order. Unreliable ones never retransmit: a message is
   *  delivered once or dropped (tunnel frames: TCP inside the tunnel does its own recovery). */
  readonly reliable: boolean
  readonly ordered: boolean
}

export const CHANNELS: Readonly<Record<ChannelName, ChannelSpec>> = {
  control: { id: 0, reliable: true, ordered: true },
  chunks: { id: 1, reliable: true, ordered: true },
  migrate: { id: 2, reliable: true, ordered: true },
  tunnel: { id: 3, reliable: false, ordered: false },
}

export const CHANNEL_NAMES = Object.keys(CHANNELS) as ChannelName[]

/** Largest message any implementation must carry (the chunk layer sizes its batches by it). */
export const MAX_MESSAGE_SIZE = 256 * 1024

export type ChannelState = 'open' | 'closed'

/**
 * A message channel with explicit backpressure.
 *
 * `send()` queues one message and returns `true` while the amount buffered is below the high-water
 * mark; `false` means "stop sending until `onDrain()` resolves". On a reliable channel a `false` send
 * was still accepted (nothing is lost); on an unreliable channel a send into a full buffer drops the
 * message and returns `false`. `send()` on a closed channel throws ChannelClosedError.
 */
export interface MessageChannel {
  readonly name: ChannelName
  readonly reliable: boolean
  readonly state: ChannelState
  /** Bytes queued but not yet handed to the network. */
  readonly bufferedAmount: number
  send(message: Uint8Array): boolean
  /** Resolves once bufferedAmount is at or below the low-water mark (at once if it already is).
   *  Rejects with ChannelClosedError when the channel closes, AbortError when the signal fires. */
  onDrain(options?: { signal?: AbortSignal }): Promise<void>
  /** Adds a handler for incoming messages; returns a function that removes it. */
  onMessage(handler: (message: Uint8Array) => void): () => void
  /** Adds a handler called once when the channel closes (with the reason, if it failed). */
  onClose(handler: (reason?: Error) => void): () => void
}

/** How a link reaches the peer: ICE candidate types, or 'memory' for the in-process implementation. */
export type PathType = 'host' | 'srflx' | 'prflx' | 'relay' | 'memory'

/** Which TCP path the bulk channels ride once moved off the WebRTC link (net/link/direct): a dialled
 *  connection, a hole-punched one (TCP simultaneous open through two NATs), or the relayed connection
 *  through a bootstrap. */
export type BulkPath = 'tcp' | 'tcp-punch' | 'tcp-relay'

export interface PathInfo {
  readonly type: PathType
  readonly local?: string
  readonly remote?: string
  /** The bulk channels (chunks, migrate) ride a libp2p connection to this address instead of the
   *  WebRTC link (net/link/direct); absent while they ride the link. */
  readonly direct?: string
  /** How that connection reaches the peer (set with `direct`). */
  readonly bulk?: BulkPath
}

export type LinkState = 'connecting' | 'open' | 'closed'

/** A point-to-point link to one peer, carrying the fixed channel set. */
export interface Link {
  /** The remote member's PeerId (string form). */
  readonly peer: string
  readonly state: LinkState
  readonly path: PathInfo
  channel(name: ChannelName): MessageChannel
  close(reason?: Error): void
  onClose(handler: (reason?: Error) => void): () => void
}

/** What services above the link layer see of the overlay: this node and its open links. */
export interface Overlay {
  /** This node's PeerId. */
  readonly self: string
  /** The link to a peer, if one is open. */
  link(peer: string): Link | undefined
  /** All open links. */
  links(): Link[]
  /** Called for every link that opens (including ones re-established after a failure). Returns an
   *  unsubscribe function. Handlers should also look at links() for links that were already open. */
  onLink(handler: (link: Link) => void): () => void
  /** The open link to `peer`, built now if there is none (large meshes keep links to a bounded set of
   *  members and build the others on demand). Rejects when no link comes up in time (default ~35 s).
   *  Overlays whose links are all fixed (in-memory, test rigs) leave it out: see openLink(). */
  connect?(peer: string, options?: { signal?: AbortSignal; timeoutMs?: number }): Promise<Link>
}
