import { type FileHandle, open, rename, rm } from 'node:fs/promises'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError, throwIfAborted } from '../../src/base/errors.ts'
import { type Fields, type Level, type Logger, silentLogger } from '../../src/base/log.ts'
import { ChannelClosedError } from '../link/errors.ts'
import type { Link, MessageChannel, Overlay } from '../link/interfaces.ts'
import { MAX_MESSAGE_SIZE } from '../link/interfaces.ts'
import { ChunkFetchError, ChunkNotFoundError, ChunkVerifyError } from './errors.ts'
import { fromHex, HASH_SIZE, hashEquals, isZeroHash, sha256, toHex } from './hash.ts'
import type { ChunkStore, Manifest } from './interfaces.ts'
import { chunkLength, decodeManifest, encodeManifest, hashAt } from './manifest.ts'
import {
  allocBlocks,
  BLOCK_HEADER,
  BLOCKS_OVERHEAD,
  type Block,
  type ChunkMessage,
  decode,
  encode,
  MANIFEST_SLICE,
  MAX_HASHES,
} from './v1/messages.ts'

export interface ChunkServiceOptions {
  overlay: Overlay
  store: ChunkStore
  log?: Logger
  /** Extra membership check on every request (the overlay already only links members). */
  authorize?: (peer: string) => boolean
  /** Answers "who has image NAME:TAG" queries with an encoded image record. */
  images?: { lookup(ref: string): Uint8Array | undefined }
  /** Chunk bytes requested but not yet stored, per peer and fetch (default 8 MiB). Bounds memory and
   *  keeps enough in flight to cover a high-latency link. */
  windowBytes?: number
  /** Give up on a peer's have/manifest/image answer after this long (default 30 s). */
  requestTimeoutMs?: number
  /** Largest BLOCKS message sent (default: the link limit, 256 KiB, i.e. three 64 KiB chunks). A
   *  chunk bigger than this still goes alone in its own message. */
  maxMessageBytes?: number
}

export interface FetchProgress {
  bytesTotal: number
  /** Fetched + skipped: how much of the resource is in place. */
  bytesDone: number
  bytesFetched: number
  bytesSkippedPresent: number
  bytesSkippedZero: number
  chunksTotal: number
  chunksFetched: number
  chunksSkipped: number
  /** Bytes of protocol messages this fetch received. */
  wireBytesIn: number
  /** Fetched bytes per second since the fetch started. */
  rateBps: number
  peers: number
}

export interface FetchOptions {
  /** Ask only these members (default: every linked member). */
  peers?: string[]
  signal?: AbortSignal
  onProgress?: (p: FetchProgress) => void
  /** Also assemble the resource into this file (written beside it, then renamed into place). */
  file?: string
  /**
   * Or update an existing file in place (e.g. the destination's copy of guest RAM during pre-copy):
   * resized to the manifest's size; with `base` (the manifest the file matches now) only chunks whose
   * name differs from base are written (changed zero chunks as zeros), so a round costs its delta.
   */
  inPlace?: { path: string; base?: Manifest }
  /** Pin the manifest under this name in the store (keeps its chunks from garbage collection). */
  pin?: string
}

export interface FetchResult extends FetchProgress {
  elapsedMs: number
  /** Peers that sent a block that did not match its name during this fetch (now distrusted). */
  badPeers: string[]
  /** Chunk bytes accepted from each peer (verified), by PeerId. */
  bytesFromPeer: Record<string, number>
  /** Chunks that were in flight from a peer that died or forged, and were asked of others again. */
  chunksRequeued: number
}

export interface ImageAnswer {
  peer: string
  record: Uint8Array
}

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

export interface ChunkService {
  start(): void
  stop(): void
  fetch(manifest: Manifest, options?: FetchOptions): Promise<FetchResult>
  /** Fetches a manifest by id from the peers (verified against the id), stores it, returns it. */
  fetchManifest(id: string, options?: { peers?: string[]; signal?: AbortSignal }): Promise<Manifest>
  /** Asks every (or the given) peer for an image record; returns the answers that found it. */
  queryImage(
    ref: string,
    options?: { peers?: string[]; signal?: AbortSignal; timeoutMs?: number },
  ): Promise<ImageAnswer[]>
  stats(): ChunkServiceStats
}

export function createChunkService(opts: ChunkServiceOptions): ChunkService {
  return new Service(opts)
}

/** Per-link state: the serving queue (what the peer wants from us) and replies awaited from the peer. */
class PeerConn {
  readonly ch: MessageChannel
  readonly serveQueue: string[] = []
  readonly queued = new Set<string>()
  serving = false
  closed = false
  /** Fetch jobs that requested a chunk (hex) from this peer. */
  readonly requested = new Map<string, Set<FetchJob>>()
  readonly offs: (() => void)[] = []
  constructor(
    readonly peer: string,
    readonly link: Link,
  ) {
    this.ch = link.channel('chunks')
  }
}

/** Chunks read for serving, as ready-to-send BLOCKS messages. */
interface ServeBatch {
  messages: { bytes: Uint8Array; blocks: number; dataBytes: number }[]
  missing: Uint8Array[]
}

/** Chunk bytes read per serving batch: 9 chunks of 64 KiB, i.e. three full BLOCKS messages, read with
 *  one readv when adjacent on disk (they are when the holder imported the file in order). */
const SERVE_BATCH_BYTES = 512 * 1024
/** Batches read ahead of the one being sent (at most ~2.3 MiB per peer being served). */
const SERVE_READ_AHEAD = 4

type Pending = { peer: string; onMessage(msg: ChunkMessage): boolean; onClose(): void }

class Service implements ChunkService {
  private readonly conns = new Map<string, PeerConn>()
  private readonly jobs = new Set<FetchJob>()
  private readonly pending = new Map<number, Pending>()
  private nextReq = 1
  private offLink: (() => void) | undefined
  readonly log: (level: Level, message: string, fields?: Fields) => void
  readonly windowBytes: number
  readonly timeoutMs: number
  readonly maxMessageBytes: number
  readonly counters: ChunkServiceStats = {
    wireBytesIn: 0,
    wireBytesOut: 0,
    blocksServed: 0,
    bytesServed: 0,
    blocksReceived: 0,
    rejectedBlocks: 0,
    peersDistrusted: 0,
  }
  /** Peers that forged a chunk: never asked for chunks again by any fetch of this service. */
  readonly distrusted = new Set<string>()

  constructor(readonly opts: ChunkServiceOptions) {
    this.log = (level, message, fields) => (opts.log ?? silentLogger)[level](message, fields)
    this.windowBytes = opts.windowBytes ?? 8 * 1024 * 1024
    this.timeoutMs = opts.requestTimeoutMs ?? 30_000
    this.maxMessageBytes = Math.min(MAX_MESSAGE_SIZE, opts.maxMessageBytes ?? MAX_MESSAGE_SIZE)
  }

  get store(): ChunkStore {
    return this.opts.store
  }

  start(): void {
    if (this.offLink !== undefined) return
    this.offLink = this.opts.overlay.onLink((link) => this.attach(link))
    for (const link of this.opts.overlay.links()) this.attach(link)
  }

  stop(): void {
    this.offLink?.()
    this.offLink = undefined
    for (const job of [...this.jobs]) job.fail(new AbortError('chunk service stopped'))
    for (const conn of [...this.conns.values()]) this.detach(conn)
  }

  stats(): ChunkServiceStats {
    return { ...this.counters }
  }

  peers(): string[] {
    return [...this.conns.keys()]
  }

  conn(peer: string): PeerConn | undefined {
    return this.conns.get(peer)
  }

  private attach(link: Link): void {
    if (link.state === 'closed') return
    const old = this.conns.get(link.peer)
    if (old?.link === link) return
    if (old !== undefined) this.detach(old)
    const conn = new PeerConn(link.peer, link)
    this.conns.set(link.peer, conn)
    conn.offs.push(conn.ch.onMessage((m) => this.onMessage(conn, m)))
    conn.offs.push(conn.ch.onClose(() => this.detach(conn)))
    conn.offs.push(link.onClose(() => this.detach(conn)))
    for (const job of this.jobs) job.peerAdded(link.peer)
  }

  private detach(conn: PeerConn): void {
    if (conn.closed) return
    conn.closed = true
    for (const off of conn.offs) off()
    if (this.conns.get(conn.peer) === conn) this.conns.delete(conn.peer)
    conn.serveQueue.length = 0
    conn.queued.clear()
    for (const [req, p] of [...this.pending]) {
      if (p.peer === conn.peer) {
        this.pending.delete(req)
        p.onClose()
      }
    }
    for (const job of this.jobs) job.peerGone(conn.peer)
    conn.requested.clear()
  }

  /** Sends one message; false = the channel is above its high-water mark. Throws if closed. */
  send(conn: PeerConn, msg: ChunkMessage): boolean {
    const bytes = encode(msg)
    this.counters.wireBytesOut += bytes.byteLength
    return conn.ch.send(bytes)
  }

  trySend(conn: PeerConn, msg: ChunkMessage): void {
    try {
      this.send(conn, msg)
    } catch (err) {
      this.log('debug', 'chunk send failed', { peer: conn.peer, error: describeError(err) })
    }
  }

  private authorized(peer: string): boolean {
    return this.opts.authorize === undefined || this.opts.authorize(peer)
  }

  private onMessage(conn: PeerConn, bytes: Uint8Array): void {
    this.counters.wireBytesIn += bytes.byteLength
    let msg: ChunkMessage
    try {
      msg = decode(bytes)
    } catch (err) {
      this.log('warn', 'malformed chunk message dropped', { peer: conn.peer, error: describeError(err) })
      return
    }
    switch (msg.type) {
      case 'have-query':
      case 'want':
      case 'cancel':
      case 'manifest-get':
      case 'image-query':
        if (!this.authorized(conn.peer)) {
          this.log('warn', 'chunk request from an unauthorized peer refused', {
            peer: conn.peer,
            type: msg.type,
          })
          this.refuse(conn, msg)
          return
        }
        this.serve(conn, msg)
        return
      case 'blocks':
        this.counters.blocksReceived += msg.blocks.length
        for (const blk of msg.blocks) {
          const hex = toHex(blk.hash)
          const jobs = conn.requested.get(hex)
          if (jobs === undefined) continue // not asked for (late after failover, or cancelled)
          conn.requested.delete(hex)
          for (const job of jobs) job.onBlock(conn.peer, hex, blk.data)
        }
        return
      case 'dont-have':
        for (const h of msg.hashes) {
          const hex = toHex(h)
          const jobs = conn.requested.get(hex)
          if (jobs === undefined) continue
          conn.requested.delete(hex)
          for (const job of jobs) job.onDontHave(conn.peer, hex)
        }
        return
      case 'have-reply':
      case 'manifest-data':
      case 'image-reply': {
        const p = this.pending.get(msg.req)
        if (p === undefined || p.peer !== conn.peer) return
        if (p.onMessage(msg)) this.pending.delete(msg.req)
        return
      }
    }
  }

  /** Answers as if we held nothing: the requester fails fast instead of waiting for a timeout. */
  private refuse(conn: PeerConn, msg: ChunkMessage): void {
    const none = new Uint8Array(0)
    if (msg.type === 'have-query')
      this.trySend(conn, { type: 'have-reply', req: msg.req, have: msg.hashes.map(() => false) })
    else if (msg.type === 'want') this.trySend(conn, { type: 'dont-have', hashes: msg.hashes })
    else if (msg.type === 'manifest-get')
      this.trySend(conn, {
        type: 'manifest-data',
        req: msg.req,
        found: false,
        total: 0,
        offset: 0,
        data: none,
      })
    else if (msg.type === 'image-query')
      this.trySend(conn, { type: 'image-reply', req: msg.req, found: false, record: none })
  }

  private serve(conn: PeerConn, msg: ChunkMessage): void {
    switch (msg.type) {
      case 'have-query':
        this.trySend(conn, {
          type: 'have-reply',
          req: msg.req,
          have: msg.hashes.map((h) => this.store.has(h)),
        })
        return
      case 'want': {
        const missing: Uint8Array[] = []
        for (const h of msg.hashes) {
          const hex = toHex(h)
          if (!this.store.has(h)) missing.push(h)
          else if (!conn.queued.has(hex)) {
            conn.queued.add(hex)
            conn.serveQueue.push(hex)
          }
        }
        if (missing.length > 0) this.trySend(conn, { type: 'dont-have', hashes: missing })
        if (!conn.serving) void this.serveLoop(conn)
        return
      }
      case 'cancel':
        for (const h of msg.hashes) conn.queued.delete(toHex(h))
        return
      case 'manifest-get':
        void this.serveManifest(conn, msg.req, toHex(msg.id))
        return
      case 'image-query': {
        const rec = this.opts.images?.lookup(msg.ref)
        this.trySend(conn, {
          type: 'image-reply',
          req: msg.req,
          found: rec !== undefined,
          record: rec ?? new Uint8Array(0),
        })
        return
      }
    }
  }

  /**
   * Sends wanted chunks as BLOCKS messages. Chunks are read in batches of about SERVE_BATCH_BYTES straight
   * into the messages (one readv per run of chunks adjacent on disk), and up to SERVE_READ_AHEAD more
   * batches are read while one goes out. After a send() returns false it waits for onDrain() before the
   * next message, so a slow link never makes this side hold more than the channel's high-water mark, one
   * message and SERVE_READ_AHEAD + 1 batches (about 3 MiB).
   */
  private async serveLoop(conn: PeerConn): Promise<void> {
    conn.serving = true
    try {
      // Several batches read ahead: each read is a round trip through libuv's thread pool, and on a
      // busy machine that thread waits for a core; one batch ahead left the holder idle half the time.
      const ahead: Promise<ServeBatch>[] = []
      const fill = () => {
        while (ahead.length < SERVE_READ_AHEAD && conn.serveQueue.length > 0) {
          const p = this.readBatch(conn)
          p.catch(() => {}) // awaited in order below; one failing while we wait on another is not unhandled
          ahead.push(p)
        }
      }
      fill()
      while (ahead.length > 0) {
        const batch: ServeBatch = await ahead.shift()!
        if (conn.closed) return
        fill()
        for (let k = 0; k < batch.missing.length; k += MAX_HASHES)
          this.send(conn, { type: 'dont-have', hashes: batch.missing.slice(k, k + MAX_HASHES) })
        for (const m of batch.messages) {
          this.counters.wireBytesOut += m.bytes.byteLength
          this.counters.blocksServed += m.blocks
          this.counters.bytesServed += m.dataBytes
          const ok = conn.ch.send(m.bytes)
          if (!ok) await conn.ch.onDrain()
          if (conn.closed) return
        }
        fill()
      }
    } catch (err) {
      if (!(err instanceof ChannelClosedError))
        this.log('warn', 'serving chunks failed', { peer: conn.peer, error: describeError(err) })
    } finally {
      conn.serving = false
    }
  }

  /** Takes up to SERVE_BATCH_BYTES of wanted chunks off the queue and reads them into BLOCKS messages. */
  private async readBatch(conn: PeerConn): Promise<ServeBatch> {
    const picked: { hash: Buffer; length: number }[] = []
    const missing: Uint8Array[] = []
    // A whole number of full messages' worth (9 chunks of 64 KiB: three messages of three).
    const perMessage = Math.max(
      1,
      Math.floor((this.maxMessageBytes - BLOCKS_OVERHEAD) / (BLOCK_HEADER + this.store.chunkSize)),
    )
    const maxChunks =
      perMessage * Math.max(1, Math.ceil(SERVE_BATCH_BYTES / (perMessage * this.store.chunkSize)))
    let bytes = 0
    while (conn.serveQueue.length > 0 && bytes < 2 * SERVE_BATCH_BYTES && picked.length < maxChunks) {
      const hex = conn.serveQueue.shift()!
      if (!conn.queued.delete(hex)) continue // cancelled
      const hash = Buffer.from(hex, 'hex')
      const length = this.store.sizeOf(hash)
      if (length === undefined) missing.push(hash)
      else {
        picked.push({ hash, length })
        bytes += length
      }
    }
    const groups: (typeof picked)[] = []
    let size = BLOCKS_OVERHEAD
    for (const p of picked) {
      const len = BLOCK_HEADER + p.length
      const cur = groups[groups.length - 1]
      if (cur === undefined || (cur.length > 0 && size + len > this.maxMessageBytes)) {
        groups.push([p])
        size = BLOCKS_OVERHEAD + len
      } else {
        cur.push(p)
        size += len
      }
    }
    const laid = groups.map((g) => ({ g, ...allocBlocks(g) }))
    const items = laid.flatMap((l) => l.g.map((b, k) => ({ hash: b.hash, target: l.slots[k]! })))
    let errs: (Error | undefined)[]
    try {
      errs = await this.store.readInto(items)
    } catch (err) {
      errs = items.map(() => (err instanceof Error ? err : new Error(String(err))))
    }
    const messages: ServeBatch['messages'] = []
    let at = 0
    for (const l of laid) {
      const good: Block[] = []
      for (const [k, b] of l.g.entries()) {
        const err = errs[at++]
        if (err === undefined) good.push({ hash: b.hash, data: l.slots[k]! })
        else {
          missing.push(b.hash)
          if (err instanceof ChunkVerifyError) this.log('error', err.message, { peer: conn.peer })
        }
      }
      const dataBytes = good.reduce((s, b) => s + b.data.byteLength, 0)
      // Rare (a chunk vanished or failed verification): re-encode the message without it.
      if (good.length === l.g.length) messages.push({ bytes: l.message, blocks: good.length, dataBytes })
      else if (good.length > 0)
        messages.push({ bytes: encode({ type: 'blocks', blocks: good }), blocks: good.length, dataBytes })
    }
    return { messages, missing }
  }

  private async serveManifest(conn: PeerConn, req: number, id: string): Promise<void> {
    try {
      if (!/^[0-9a-f]{64}$/.test(id) || !this.store.hasManifest(id)) {
        this.send(conn, {
          type: 'manifest-data',
          req,
          found: false,
          total: 0,
          offset: 0,
          data: new Uint8Array(0),
        })
        return
      }
      const bytes = encodeManifest(await this.store.getManifest(id))
      for (let off = 0; off === 0 || off < bytes.byteLength; off += MANIFEST_SLICE) {
        const data = bytes.subarray(off, off + MANIFEST_SLICE)
        const ok = this.send(conn, {
          type: 'manifest-data',
          req,
          found: true,
          total: bytes.byteLength,
          offset: off,
          data,
        })
        if (!ok) await conn.ch.onDrain()
      }
    } catch (err) {
      this.log('warn', 'serving a manifest failed', { peer: conn.peer, id, error: describeError(err) })
    }
  }

  /** Sends a request carrying a fresh req id and collects replies until `onMessage` returns true. */
  request<T>(
    conn: PeerConn,
    make: (req: number) => ChunkMessage,
    collect: (msg: ChunkMessage, resolve: (v: T) => void, reject: (e: Error) => void) => boolean,
    signal?: AbortSignal,
  ): Promise<T> {
    const req = this.nextReq
    this.nextReq = (this.nextReq % 0xffffffff) + 1
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(
        () => finish(new ChunkFetchError(`peer ${conn.peer} did not answer in time`)),
        this.timeoutMs,
      )
      const abortNow = () => finish(new AbortError(undefined, { cause: signal?.reason }))
      const finish = (err?: Error, value?: T) => {
        clearTimeout(timer)
        offAbort()
        this.pending.delete(req)
        if (err !== undefined) reject(err)
        else resolve(value as T)
      }
      const offAbort = onAbort(signal, abortNow)
      this.pending.set(req, {
        peer: conn.peer,
        onMessage: (msg) =>
          collect(
            msg,
            (v) => finish(undefined, v),
            (e) => finish(e),
          ),
        onClose: () => finish(new ChannelClosedError(`link to ${conn.peer} closed`)),
      })
      try {
        this.send(conn, make(req))
      } catch (err) {
        finish(err instanceof Error ? err : new Error(String(err)))
      }
    })
  }

  haveQuery(conn: PeerConn, hashes: Uint8Array[], signal?: AbortSignal): Promise<boolean[]> {
    return this.request<boolean[]>(
      conn,
      (req) => ({ type: 'have-query', req, hashes }),
      (msg, resolve, reject) => {
        if (msg.type !== 'have-reply' || msg.have.length !== hashes.length)
          reject(new ChunkFetchError('bad have-reply'))
        else resolve(msg.have)
        return true
      },
      signal,
    )
  }

  async fetchManifest(
    id: string,
    options: { peers?: string[]; signal?: AbortSignal } = {},
  ): Promise<Manifest> {
    if (this.store.hasManifest(id)) return this.store.getManifest(id)
    const idBytes = fromHex(id)
    const peers = options.peers ?? this.peers()
    const errors: string[] = []
    for (const peer of peers) {
      throwIfAborted(options.signal)
      const conn = this.conns.get(peer)
      if (conn === undefined) continue
      try {
        const bytes = await this.request<Uint8Array | undefined>(
          conn,
          (req) => ({ type: 'manifest-get', req, id: idBytes }),
          (() => {
            let buf: Buffer | undefined
            let got = 0
            return (msg, resolve, reject) => {
              if (msg.type !== 'manifest-data') {
                reject(new ChunkFetchError('bad manifest reply'))
                return true
              }
              if (!msg.found) {
                resolve(undefined)
                return true
              }
              // A manifest is at most a few MiB (decode limit); refuse silly totals before allocating.
              if (msg.total > 160 * 1024 * 1024 || (buf !== undefined && buf.byteLength !== msg.total)) {
                reject(new ChunkFetchError('bad manifest size'))
                return true
              }
              buf ??= Buffer.alloc(msg.total)
              if (msg.offset !== got) {
                reject(new ChunkFetchError('manifest slices out of order'))
                return true
              }
              buf.set(msg.data, msg.offset)
              got += msg.data.byteLength
              if (got >= msg.total) {
                resolve(buf)
                return true
              }
              return false
            }
          })(),
          options.signal,
        )
        if (bytes === undefined) continue
        if (toHex(sha256(bytes)) !== id) {
          const err = new ChunkVerifyError(`manifest from ${peer} does not match its id ${id}`)
          this.log('error', err.message, { peer })
          errors.push(err.message)
          continue
        }
        const m = decodeManifest(bytes)
        await this.store.putManifest(m)
        return m
      } catch (err) {
        if (err instanceof AbortError) throw err
        errors.push(`${peer}: ${describeError(err)}`)
      }
    }
    throw new ChunkNotFoundError(
      `no member could provide manifest ${id}${errors.length > 0 ? ` (${errors.join('; ')})` : ''}`,
    )
  }

  async queryImage(
    ref: string,
    options: { peers?: string[]; signal?: AbortSignal; timeoutMs?: number } = {},
  ): Promise<ImageAnswer[]> {
    const peers = options.peers ?? this.peers()
    const answers = await Promise.allSettled(
      peers.map(async (peer) => {
        const conn = this.conns.get(peer)
        if (conn === undefined) return undefined
        const rec = await this.request<Uint8Array | undefined>(
          conn,
          (req) => ({ type: 'image-query', req, ref }),
          (msg, resolve) => {
            resolve(
              msg.type === 'image-reply' && msg.found
                ? Uint8Array.prototype.slice.call(msg.record)
                : undefined,
            )
            return true
          },
          options.signal,
        )
        return rec === undefined ? undefined : { peer, record: rec }
      }),
    )
    throwIfAborted(options.signal)
    return answers.flatMap((a) => (a.status === 'fulfilled' && a.value !== undefined ? [a.value] : []))
  }

  async fetch(manifest: Manifest, options: FetchOptions = {}): Promise<FetchResult> {
    throwIfAborted(options.signal)
    const job = new FetchJob(this, manifest, options)
    this.jobs.add(job)
    try {
      return await job.run()
    } finally {
      this.jobs.delete(job)
    }
  }

  /** A peer sent bytes that do not match their name: no fetch asks it for chunks again. */
  distrust(peer: string): void {
    if (this.distrusted.has(peer)) return
    this.distrusted.add(peer)
    this.counters.peersDistrusted = this.distrusted.size
    this.log('warn', 'member distrusted: it sent a chunk that does not match its name', { peer })
    for (const job of this.jobs) job.distrust(peer)
  }

  register(conn: PeerConn, hex: string, job: FetchJob): void {
    let set = conn.requested.get(hex)
    if (set === undefined) {
      set = new Set()
      conn.requested.set(hex, set)
    }
    set.add(job)
  }

  unregister(peer: string, hex: string, job: FetchJob): void {
    const conn = this.conns.get(peer)
    const set = conn?.requested.get(hex)
    if (set === undefined) return
    set.delete(job)
    if (set.size === 0) conn!.requested.delete(hex)
  }
}

/** A busy peer is sent a WANT once this much of its window is free (a quarter of smaller windows). */
const WANT_MIN_BYTES = 1024 * 1024
/** Present chunks copied into the target file per batch (one readInto each). */
const PRESENT_BATCH = 64
const EMIT_BYTES = 1024 * 1024
const EMIT_MS = 100

/**
 * Positional writes into the fetch's file, batched: everything queued in one turn of the event loop
 * is sorted and written as runs of adjacent chunks, one writev each (async fs calls cost ~70 µs each
 * here whatever their size; one per 64 KiB chunk was a large share of a pull's CPU).
 */
class FileWriter {
  private queue: { pos: number; data: Uint8Array; resolve(): void; reject(e: Error): void }[] = []
  private running = false

  constructor(private readonly fh: FileHandle) {}

  write(pos: number, data: Uint8Array): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ pos, data, resolve, reject })
      if (!this.running) {
        this.running = true
        setImmediate(() => void this.flush())
      }
    })
  }

  private async flush(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue.sort((a, b) => a.pos - b.pos)
      this.queue = []
      let k = 0
      while (k < batch.length) {
        let end = k + 1
        let next = batch[k]!.pos + batch[k]!.data.byteLength
        while (end < batch.length && batch[end]!.pos === next && end - k < 1000) {
          next += batch[end]!.data.byteLength
          end++
        }
        const run = batch.slice(k, end)
        try {
          await writeAll(
            this.fh,
            run.map((r) => r.data),
            run[0]!.pos,
          )
          for (const r of run) r.resolve()
        } catch (err) {
          for (const r of run) r.reject(err instanceof Error ? err : new Error(String(err)))
        }
        k = end
      }
    }
    this.running = false
  }
}

async function writeAll(fh: FileHandle, bufs: Uint8Array[], pos: number): Promise<void> {
  const total = bufs.reduce((s, b) => s + b.byteLength, 0)
  let written = (await fh.writev(bufs, pos)).bytesWritten
  if (written >= total) return
  // Short writev (rare on regular files): write the rest from a joined copy.
  const rest = Buffer.concat(bufs).subarray(written)
  let off = 0
  while (written < total) {
    const n = (await fh.write(rest, off, rest.byteLength - off, pos + written)).bytesWritten
    written += n
    off += n
  }
}

let zeros = Buffer.alloc(0)
function zeroBuffer(len: number): Buffer {
  if (zeros.byteLength < len) zeros = Buffer.alloc(len)
  return zeros
}

/** One distinct chunk a fetch still needs: where it goes and its state. */
interface Entry {
  hex: string
  hash: Uint8Array
  len: number
  indices: number[]
  /** 0 pending, 1 requested, 2 being stored, 3 done */
  state: 0 | 1 | 2 | 3
  from?: string
}

interface JobPeer {
  peer: string
  /** Per entry: 0 unknown, 1 holds, 2 does not hold. */
  has: Uint8Array
  /** Entries this peer holds, in request order; `cursor` skips ones already taken. */
  list: number[]
  cursor: number
  inflightBytes: number
  inflight: Set<number>
  queries: number
  bad: boolean
  gone: boolean
}

class FetchJob {
  private readonly entries: Entry[] = []
  private readonly byHex = new Map<string, number>()
  private readonly peers = new Map<string, JobPeer>()
  private readonly progress: FetchProgress
  private readonly started = performance.now()
  private remaining = 0
  private resolve: (() => void) | undefined
  private reject: ((e: Error) => void) | undefined
  private finished = false
  /** Why the job failed, if it did before the network phase started. */
  private failure: Error | undefined
  private fh: FileHandle | undefined
  private writer: FileWriter | undefined
  private tmpFile: string | undefined
  private writes = 0
  private readonly abortCtl = new AbortController()
  private readonly bytesFromPeer: Record<string, number> = {}
  private chunksRequeued = 0
  private pumpScheduled = false
  private lastEmit = 0
  private lastEmitBytes = 0

  constructor(
    private readonly svc: Service,
    private readonly m: Manifest,
    private readonly opts: FetchOptions,
  ) {
    this.progress = {
      bytesTotal: m.size,
      bytesDone: 0,
      bytesFetched: 0,
      bytesSkippedPresent: 0,
      bytesSkippedZero: 0,
      chunksTotal: m.count,
      chunksFetched: 0,
      chunksSkipped: 0,
      wireBytesIn: 0,
      rateBps: 0,
      peers: 0,
    }
  }

  async run(): Promise<FetchResult> {
    const { store } = this.svc
    const signal = this.opts.signal
    // Pin first: chunks stored by this fetch must survive a gc() running meanwhile.
    const id = await store.putManifest(this.m)
    if (this.opts.pin !== undefined) await store.pin(this.opts.pin, id)
    const lease = store.lease()
    try {
      const inPlace = this.opts.inPlace
      const base = inPlace?.base
      if (base !== undefined && base.chunkSize !== this.m.chunkSize)
        throw new RangeError('base manifest has another chunk size')
      if (inPlace !== undefined) {
        // 'a+' creates the file if needed without truncating; writes need 'r+' (positional).
        await (await open(inPlace.path, 'a+')).close()
        const fh = await open(inPlace.path, 'r+')
        this.fh = fh
        if ((await fh.stat()).size !== this.m.size) await fh.truncate(this.m.size)
      } else if (this.opts.file !== undefined) {
        this.tmpFile = `${this.opts.file}.part-${process.pid}`
        this.fh = await open(this.tmpFile, 'w')
        await this.fh.truncate(this.m.size) // sparse: zero chunks need no write
      }
      if (this.fh !== undefined) this.writer = new FileWriter(this.fh)
      const writer = this.writer
      const zeroWrites: Promise<void>[] = []
      const present: Entry[] = []
      const presentByHex = new Map<string, Entry>()
      for (let i = 0; i < this.m.count; i++) {
        const h = hashAt(this.m, i)
        const len = chunkLength(this.m, i)
        if (base !== undefined && i < base.count && hashEquals(hashAt(base, i), h)) {
          // Unchanged since the base: the file already holds these bytes.
          this.progress.bytesSkippedPresent += len
          this.progress.chunksSkipped++
          continue
        }
        if (isZeroHash(h)) {
          // A fresh file is sparse; a file updated in place may hold old bytes there.
          if (inPlace !== undefined) zeroWrites.push(writer!.write(i * this.m.chunkSize, zeroBuffer(len)))
          this.progress.bytesSkippedZero += len
          this.progress.chunksSkipped++
          continue
        }
        const hex = toHex(h)
        const at = this.byHex.get(hex)
        if (at !== undefined) {
          this.entries[at]!.indices.push(i)
          continue
        }
        const seen = presentByHex.get(hex)
        if (seen !== undefined) {
          seen.indices.push(i)
          continue
        }
        lease.add(h)
        const e: Entry = { hex, hash: h, len, indices: [i], state: 0 }
        if (store.has(h)) {
          present.push(e)
          presentByHex.set(hex, e)
        } else {
          this.byHex.set(hex, this.entries.length)
          this.entries.push(e)
        }
      }
      await Promise.all(zeroWrites)
      // Copy what the store already holds, in batches read with few system calls (a read that fails
      // verification makes the chunk needed).
      for (let k = 0; k < present.length; k += PRESENT_BATCH) {
        throwIfAborted(signal)
        const batch = present.slice(k, k + PRESENT_BATCH)
        let errs: (Error | undefined)[] = batch.map(() => undefined)
        if (writer !== undefined) {
          const items = batch.map((e) => ({ hash: e.hash, target: Buffer.allocUnsafe(e.len) }))
          errs = await store.readInto(items)
          const w: Promise<void>[] = []
          batch.forEach((e, j) => {
            if (errs[j] === undefined)
              for (const i of e.indices) w.push(writer.write(i * this.m.chunkSize, items[j]!.target))
          })
          await Promise.all(w)
        }
        batch.forEach((e, j) => {
          const err = errs[j]
          if (err === undefined) {
            this.progress.bytesSkippedPresent += e.len * e.indices.length
            this.progress.chunksSkipped += e.indices.length
            return
          }
          if (!(err instanceof ChunkVerifyError || err instanceof ChunkNotFoundError)) throw err
          this.svc.log('error', describeError(err))
          this.byHex.set(e.hex, this.entries.length)
          this.entries.push(e)
        })
      }
      this.updateDone()
      this.remaining = this.entries.length
      if (this.remaining > 0) await this.network()
      if (this.fh !== undefined) {
        await this.fh.sync()
        await this.fh.close()
        this.fh = undefined
        if (this.tmpFile !== undefined) await rename(this.tmpFile, this.opts.file!)
      }
      this.emit(true)
      return {
        ...this.progress,
        elapsedMs: performance.now() - this.started,
        badPeers: [...this.peers.values()].filter((p) => p.bad).map((p) => p.peer),
        bytesFromPeer: { ...this.bytesFromPeer },
        chunksRequeued: this.chunksRequeued,
      }
    } finally {
      lease.release()
      this.finished = true
      this.abortCtl.abort()
      for (const p of this.peers.values()) this.cancelPeer(p)
      if (this.fh !== undefined) {
        await this.fh.close().catch(() => {})
        if (this.tmpFile !== undefined) await rm(this.tmpFile, { force: true })
      }
    }
  }

  private network(): Promise<void> {
    const signal = this.opts.signal
    return new Promise<void>((resolve, reject) => {
      if (this.failure !== undefined) return reject(this.failure)
      if (signal?.aborted === true)
        return reject(new AbortError('chunk fetch aborted', { cause: signal.reason }))
      const abortNow = () => this.fail(new AbortError('chunk fetch aborted', { cause: signal?.reason }))
      const offAbort = onAbort(signal, abortNow)
      this.resolve = () => {
        offAbort()
        resolve()
      }
      this.reject = (e) => {
        offAbort()
        reject(e)
      }
      const candidates = this.opts.peers ?? this.svc.peers()
      for (const peer of candidates) this.addPeer(peer)
      this.checkStuck()
    })
  }

  fail(err: Error): void {
    if (this.finished) return
    this.finished = true
    this.failure = err
    this.reject?.(err)
  }

  private addPeer(peer: string): void {
    if (this.finished || this.peers.has(peer) || this.svc.distrusted.has(peer)) return
    const conn = this.svc.conn(peer)
    if (conn === undefined) return
    const p: JobPeer = {
      peer,
      has: new Uint8Array(this.entries.length),
      list: [],
      cursor: 0,
      inflightBytes: 0,
      inflight: new Set(),
      queries: 0,
      bad: false,
      gone: false,
    }
    this.peers.set(peer, p)
    this.progress.peers = [...this.peers.values()].filter((x) => !x.gone && !x.bad).length
    // Ask only about what is still pending, in batches the protocol allows.
    const todo: number[] = []
    this.entries.forEach((e, i) => {
      if (e.state !== 3) todo.push(i)
    })
    for (let k = 0; k < todo.length; k += MAX_HASHES) {
      const slice = todo.slice(k, k + MAX_HASHES)
      p.queries++
      this.svc
        .haveQuery(
          conn,
          slice.map((i) => this.entries[i]!.hash),
          this.abortCtl.signal,
        )
        .then(
          (have) => {
            p.queries--
            if (this.finished || p.gone) return
            have.forEach((v, j) => {
              const i = slice[j]!
              if (p.has[i] === 2) return
              p.has[i] = v ? 1 : 2
              if (v) p.list.push(i)
            })
            this.schedulePump()
          },
          (err) => {
            p.queries--
            if (!this.finished)
              this.svc.log('debug', 'have query failed', { peer, error: describeError(err) })
            this.checkStuck()
          },
        )
    }
  }

  peerAdded(peer: string): void {
    // A member that (re)joined while the fetch runs may hold what is left; only if not restricted.
    if (this.opts.peers !== undefined && !this.opts.peers.includes(peer)) return
    const old = this.peers.get(peer)
    if (old !== undefined) {
      if (old.bad || !old.gone) return
      this.peers.delete(peer)
    }
    if (this.remaining > 0) this.addPeer(peer)
  }

  peerGone(peer: string): void {
    const p = this.peers.get(peer)
    if (p === undefined || p.gone) return
    p.gone = true
    this.progress.peers = [...this.peers.values()].filter((x) => !x.gone && !x.bad).length
    this.requeueAll(p)
    this.pump()
  }

  private requeueAll(p: JobPeer): void {
    for (const i of p.inflight) {
      const e = this.entries[i]!
      if (e.state === 1 && e.from === p.peer) {
        this.requeue(i)
        this.chunksRequeued++
      }
    }
    p.inflight.clear()
    p.inflightBytes = 0
  }

  /** Back to pending, offered again to every other live holder. */
  private requeue(i: number): void {
    const e = this.entries[i]!
    e.state = 0
    e.from = undefined
    for (const q of this.peers.values()) {
      if (!q.gone && !q.bad && q.has[i] === 1) q.list.push(i)
    }
  }

  private cancelPeer(p: JobPeer): void {
    if (p.inflight.size === 0) return
    const conn = this.svc.conn(p.peer)
    const hashes: Uint8Array[] = []
    for (const i of p.inflight) {
      const e = this.entries[i]!
      this.svc.unregister(p.peer, e.hex, this)
      hashes.push(e.hash)
    }
    p.inflight.clear()
    p.inflightBytes = 0
    if (conn === undefined) return
    for (let k = 0; k < hashes.length; k += MAX_HASHES)
      this.svc.trySend(conn, { type: 'cancel', hashes: hashes.slice(k, k + MAX_HASHES) })
  }

  /** Fills every live peer's window with pending chunks it holds; one WANT message per batch. */
  private pump(): void {
    if (this.finished) return
    for (const p of this.peers.values()) {
      if (p.gone || p.bad) continue
      const conn = this.svc.conn(p.peer)
      if (conn === undefined) continue
      // Refill in steps of at least WANT_MIN_BYTES while the window is busy: each WANT costs a frame,
      // an encryption and a system call or two at both ends, and one per stored batch was many.
      const free = this.svc.windowBytes - p.inflightBytes
      if (p.inflight.size > 0 && free < Math.min(WANT_MIN_BYTES, this.svc.windowBytes / 4)) continue
      const want: Uint8Array[] = []
      while (p.inflightBytes < this.svc.windowBytes && p.cursor < p.list.length) {
        const i = p.list[p.cursor++]!
        const e = this.entries[i]!
        if (e.state !== 0) continue
        e.state = 1
        e.from = p.peer
        p.inflight.add(i)
        p.inflightBytes += e.len
        this.svc.register(conn, e.hex, this)
        want.push(e.hash)
        if (want.length === MAX_HASHES) {
          this.svc.trySend(conn, { type: 'want', hashes: want.splice(0) })
        }
      }
      if (p.cursor === p.list.length && p.cursor > 0) {
        p.list = []
        p.cursor = 0
      }
      if (want.length > 0) this.svc.trySend(conn, { type: 'want', hashes: want })
    }
    this.checkStuck()
  }

  onBlock(peer: string, hex: string, data: Uint8Array): void {
    const i = this.byHex.get(hex)
    const p = this.peers.get(peer)
    if (i === undefined || p === undefined || this.finished) return
    const e = this.entries[i]!
    this.progress.wireBytesIn += HASH_SIZE + 4 + data.byteLength
    if (e.state !== 1 || e.from !== peer) return
    if (data.byteLength !== e.len || !hashEquals(sha256(data), e.hash)) {
      const err = new ChunkVerifyError(
        `peer ${peer} sent bytes that do not match chunk ${hex}; not asking it again`,
      )
      this.svc.log('error', err.message, { peer })
      this.svc.counters.rejectedBlocks++
      this.distrust(peer)
      return
    }
    e.state = 2
    this.writes++
    void this.storeBlock(p, i, e, data)
  }

  /** Drops a forging peer from this fetch: what it still owes is asked of the others. */
  distrust(peer: string): void {
    const p = this.peers.get(peer)
    if (p === undefined || p.bad) {
      this.svc.distrust(peer)
      return
    }
    p.bad = true
    this.requeueAll(p)
    this.cancelPeer(p)
    this.progress.peers = [...this.peers.values()].filter((x) => !x.gone && !x.bad).length
    this.svc.distrust(peer)
    this.schedulePump()
  }

  /** The window slot is released only once the chunk is on disk: a slow disk slows the requests. */
  private async storeBlock(p: JobPeer, i: number, e: Entry, data: Uint8Array): Promise<void> {
    try {
      // Into the store and the file at once; both writers batch what arrives meanwhile.
      const w = [this.svc.store.putVerified(e.hash, data)]
      if (this.writer !== undefined)
        for (const idx of e.indices) w.push(this.writer.write(idx * this.m.chunkSize, data))
      await Promise.all(w)
    } catch (err) {
      this.writes--
      this.fail(err instanceof Error ? err : new Error(String(err)))
      return
    }
    this.writes--
    e.state = 3
    if (p.inflight.delete(i)) p.inflightBytes -= e.len
    this.remaining--
    this.progress.bytesFetched += e.len * e.indices.length
    this.progress.chunksFetched += e.indices.length
    this.bytesFromPeer[p.peer] = (this.bytesFromPeer[p.peer] ?? 0) + e.len * e.indices.length
    this.emit()
    if (this.remaining === 0 && this.writes === 0) {
      if (!this.finished) {
        this.finished = true
        this.resolve?.()
      }
      return
    }
    this.schedulePump()
  }

  /**
   * One pump for everything that completed in this turn of the event loop: the store completes its
   * writes in batches, and one WANT for the freed window beats one WANT per chunk.
   */
  private schedulePump(): void {
    if (this.pumpScheduled) return
    this.pumpScheduled = true
    setImmediate(() => {
      this.pumpScheduled = false
      this.pump()
    })
  }

  onDontHave(peer: string, hex: string): void {
    const i = this.byHex.get(hex)
    const p = this.peers.get(peer)
    if (i === undefined || p === undefined) return
    p.has[i] = 2
    const e = this.entries[i]!
    if (p.inflight.delete(i)) p.inflightBytes -= e.len
    if (e.state === 1 && e.from === peer) this.requeue(i)
    this.schedulePump()
  }

  /** Fails the fetch when some pending chunk has no live honest holder and no answer is awaited. */
  private checkStuck(): void {
    if (this.finished || this.remaining === 0) return
    const live = [...this.peers.values()].filter((p) => !p.gone && !p.bad)
    if (live.some((p) => p.queries > 0 || p.inflight.size > 0) || this.writes > 0) return
    const missing = this.entries.filter((e) => e.state === 0).length
    if (missing === 0) return
    this.fail(
      new ChunkFetchError(
        `${missing} chunk(s) are held by no reachable member (asked ${this.peers.size} peer(s)); the chunks fetched so far are kept, retry to resume`,
      ),
    )
  }

  private updateDone(): void {
    const p = this.progress
    p.bytesDone = p.bytesFetched + p.bytesSkippedPresent + p.bytesSkippedZero
    const secs = (performance.now() - this.started) / 1000
    p.rateBps = secs > 0 ? p.bytesFetched / secs : 0
  }

  /** Progress every EMIT_BYTES (or 1/64 of the size) or EMIT_MS (a CLI turns each into a JSON event),
   *  and at the end. */
  private emit(force = false): void {
    if (this.opts.onProgress === undefined) return
    this.updateDone()
    const now = performance.now()
    const done = this.progress.bytesDone
    // Big resources report every 1/64 of their size: at 1 MiB steps a 256 MiB pull made 256 events,
    // each a JSON line through the control socket (a few % of a puller's CPU).
    const step = Math.max(EMIT_BYTES, this.m.size / 64)
    if (!force && done - this.lastEmitBytes < step && now - this.lastEmit < EMIT_MS) return
    this.lastEmit = now
    this.lastEmitBytes = done
    this.opts.onProgress({ ...this.progress })
  }
}
