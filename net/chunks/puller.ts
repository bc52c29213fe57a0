import { type FileHandle, open, rename, rm } from 'node:fs/promises'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError, throwIfAborted } from '../../src/base/errors.ts'
import { ChunkFetchError, ChunkNotFoundError, ChunkVerifyError } from './errors.ts'
import { FileWriter, zeroBuffer } from './file-writer.ts'
import { HASH_SIZE, hashEquals, isZeroHash, toHex } from './hash.ts'
import type { Manifest } from './interfaces.ts'
import { chunkLength, hashAt } from './manifest.ts'
import type { BlockSink, ExchangeSession } from './session.ts'
import { MAX_HASHES } from './v1/messages.ts'

/**
 * The puller's half of the chunk service: one FetchJob per fetch asks every holder what it has, keeps a
 * window of wanted chunks in flight per peer, verifies each block against its name before anything is
 * stored or written, and requeues what a dead or forging peer owed.
 */

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

/** A busy peer is sent a WANT once this much of its window is free (a quarter of smaller windows). */
const WANT_MIN_BYTES = 1024 * 1024
/** Present chunks copied into the target file per batch (one readInto each). */
const PRESENT_BATCH = 64
const EMIT_BYTES = 1024 * 1024
const EMIT_MS = 100

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

export class FetchJob implements BlockSink {
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
    private readonly svc: ExchangeSession,
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

  onBlock(peer: string, hex: string, data: Uint8Array, hashOk: boolean): void {
    const i = this.byHex.get(hex)
    const p = this.peers.get(peer)
    if (i === undefined || p === undefined || this.finished) return
    const e = this.entries[i]!
    this.progress.wireBytesIn += HASH_SIZE + 4 + data.byteLength
    if (e.state !== 1 || e.from !== peer) return
    // hashOk: the service hashed the bytes against this name before handing them over (verifier.ts).
    if (data.byteLength !== e.len || !hashOk) {
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
