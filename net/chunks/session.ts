import type { Fields, Level } from '../../src/base/log.ts'
import type { Link, MessageChannel } from '../link/interfaces.ts'
import type { ChunkStore } from './interfaces.ts'
import type { ChunkMessage } from './v1/messages.ts'

/**
 * What the chunk service's two halves share: the holder (holder.ts, serves what peers want) and the
 * puller (puller.ts, one FetchJob per fetch) work through this session view of the service
 * (exchange.ts), which owns the links, the wire and the replies awaited.
 */

export interface ChunkServiceStats {
  wireBytesIn: number
  wireBytesOut: number
  blocksServed: number
  bytesServed: number
  blocksReceived: number
  rejectedBlocks: number
  /** Members this service no longer asks for chunks: they sent a block that did not match its name. */
  peersDistrusted: number
}

/** Where a received block or a peer's "don't have" goes: the fetch that asked for the chunk. */
export interface BlockSink {
  /** `hashOk`: sha256(data) equals the chunk's name `hex` (the service checked it). */
  onBlock(peer: string, hex: string, data: Uint8Array, hashOk: boolean): void
  onDontHave(peer: string, hex: string): void
}

/** Per-link state: the serving queue (what the peer wants from us) and replies awaited from the peer. */
export class PeerConn {
  readonly ch: MessageChannel
  readonly serveQueue: string[] = []
  readonly queued = new Set<string>()
  serving = false
  closed = false
  /** Fetch jobs that requested a chunk (hex) from this peer. */
  readonly requested = new Map<string, Set<BlockSink>>()
  readonly offs: (() => void)[] = []
  constructor(
    readonly peer: string,
    readonly link: Link,
  ) {
    this.ch = link.channel('chunks')
  }
}

export interface ExchangeSession {
  readonly store: ChunkStore
  readonly log: (level: Level, message: string, fields?: Fields) => void
  readonly counters: ChunkServiceStats
  /** Chunk bytes requested but not yet stored, per peer and fetch. */
  readonly windowBytes: number
  /** Largest BLOCKS message sent. */
  readonly maxMessageBytes: number
  /** Peers that forged a chunk: never asked for chunks again by any fetch of this service. */
  readonly distrusted: ReadonlySet<string>
  /** The encoded image record for "who has image NAME:TAG", if this member has one. */
  lookupImage(ref: string): Uint8Array | undefined
  peers(): string[]
  conn(peer: string): PeerConn | undefined
  /** Sends one message; false = the channel is above its high-water mark. Throws if closed. */
  send(conn: PeerConn, msg: ChunkMessage): boolean
  trySend(conn: PeerConn, msg: ChunkMessage): void
  haveQuery(conn: PeerConn, hashes: Uint8Array[], signal?: AbortSignal): Promise<boolean[]>
  register(conn: PeerConn, hex: string, sink: BlockSink): void
  unregister(peer: string, hex: string, sink: BlockSink): void
  /** A peer sent bytes that do not match their name: no fetch asks it for chunks again. */
  distrust(peer: string): void
}
