import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError, throwIfAborted } from '../../src/base/errors.ts'
import { type Fields, type Level, type Logger, silentLogger } from '../../src/base/log.ts'
import { ChannelClosedError } from '../link/errors.ts'
import type { Link, Overlay } from '../link/interfaces.ts'
import { MAX_MESSAGE_SIZE } from '../link/interfaces.ts'
import { ChunkFetchError, ChunkNotFoundError, ChunkVerifyError } from './errors.ts'
import { fromHex, sha256, toHex } from './hash.ts'
import { Holder } from './holder.ts'
import type { ChunkStore, Manifest } from './interfaces.ts'
import { decodeManifest } from './manifest.ts'
import { FetchJob, type FetchOptions, type FetchResult } from './puller.ts'
import { type BlockSink, type ChunkServiceStats, type ExchangeSession, PeerConn } from './session.ts'
import { type ChunkMessage, decode, encode } from './v1/messages.ts'
import { type BlockVerifier, createBlockVerifier } from './verifier.ts'

/**
 * The chunk service: members fetch content-addressed chunks from each other over the overlay's
 * 'chunks' channel. This file owns the links, the wire (decode, dispatch, requests awaiting replies)
 * and the manifest/image queries; the holder's side is holder.ts, a fetch is puller.ts (FetchJob).
 */

export type { FetchOptions, FetchProgress, FetchResult } from './puller.ts'
export type { ChunkServiceStats } from './session.ts'

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
  /** Worker threads that hash received blocks (default: cores − 2, at most 2; 0: the main thread
   *  hashes them). See verifier.ts for when a worker pays. */
  verifyThreads?: number
}

export interface ImageAnswer {
  peer: string
  record: Uint8Array
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

type Pending = { peer: string; onMessage(msg: ChunkMessage): boolean; onClose(): void }

class Service implements ChunkService, ExchangeSession {
  private readonly conns = new Map<string, PeerConn>()
  private readonly holder: Holder = new Holder(this)
  private verifier: BlockVerifier
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
    this.verifier = createBlockVerifier({ threads: opts.verifyThreads })
  }

  lookupImage(ref: string): Uint8Array | undefined {
    return this.opts.images?.lookup(ref)
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
    // Workers start again on demand if the service is started again.
    this.verifier.close()
    this.verifier = createBlockVerifier({ threads: this.opts.verifyThreads })
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
          this.holder.refuse(conn, msg)
          return
        }
        this.holder.serve(conn, msg)
        return
      case 'blocks': {
        this.counters.blocksReceived += msg.blocks.length
        // Only what was asked for is hashed (late blocks after a failover or a cancel are dropped);
        // nothing reaches a fetch before its hash was checked.
        const wanted = msg.blocks.filter((blk) => conn.requested.has(toHex(blk.hash)))
        if (wanted.length === 0) return
        // Named before verify(): the blocks' old views are unusable while their buffer is away.
        const hexes = wanted.map((blk) => toHex(blk.hash))
        // The message's buffer may travel to the verifier's worker and back (verifier.ts).
        void this.verifier.verify(wanted, bytes).then(({ ok, data, lost }) => {
          hexes.forEach((hex, k) => {
            const jobs = conn.requested.get(hex)
            if (jobs === undefined) return // the link closed or the fetch ended meanwhile
            conn.requested.delete(hex)
            // A verifier that died with the bytes checked nothing: the chunk is asked of others again.
            if (lost === true) for (const job of jobs) job.onDontHave(conn.peer, hex)
            else for (const job of jobs) job.onBlock(conn.peer, hex, data[k]!, ok[k] === true)
          })
        })
        return
      }
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

  register(conn: PeerConn, hex: string, job: BlockSink): void {
    let set = conn.requested.get(hex)
    if (set === undefined) {
      set = new Set()
      conn.requested.set(hex, set)
    }
    set.add(job)
  }

  unregister(peer: string, hex: string, job: BlockSink): void {
    const conn = this.conns.get(peer)
    const set = conn?.requested.get(hex)
    if (set === undefined) return
    set.delete(job)
    if (set.size === 0) conn!.requested.delete(hex)
  }
}
