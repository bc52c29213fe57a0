/**
 * The source side of a VM's writable disk in a live migration (a SourceStream, next to RAM's): the
 * base never travels (the destination's runtime gets it by image name from the chunk layer, skipping
 * what it holds); what the overlay holds is offered as chunk hashes in batches and sent as far as the
 * destination lacks it; then each pre-copy round sends what QEMU's dirty bitmap saw; in the pause (QEMU
 * drained the guest's I/O when it stopped) the last round holds every remaining write.
 */
import { createHash } from 'node:crypto'
import { promisify } from 'node:util'
import { deflateRaw } from 'node:zlib'
import type { Vm } from '../driver/interfaces.ts'
import { MigrationLinkError } from '../migration/errors.ts'
import { faultPoint } from '../migration/fault-points.ts'
import type { PendingSet, SourceContext, SourceStream } from '../migration/stream.ts'
import { encodeDiskInPlace, HEADER_SIZE } from '../migration/v1/messages.ts'
import { looksCompressible } from './compressible.ts'
import type { DiskDirtyRound, DiskTracker } from './tracker.ts'
import {
  DISK_HASH_SIZE,
  type DiskChunk,
  type DiskMessage,
  decodeDiskMessage,
  encodeDiskMessage,
  FLAG_DEFLATED,
  FLAG_ZERO,
  MAX_DISK_CHUNKS_PER_DATA,
} from './v1/messages.ts'

const deflateRawAsync = promisify(deflateRaw)

/** Chunks per offer batch: the batch's bytes wait in memory for the destination's answer. */
const OFFER_BATCH = 512
/** Chunks per NBD read (consecutive ones). */
const READ_RUN = 64
/** Payload a 'data' message aims below (the link carries 256 KiB). */
const TARGET_BYTES = 200 * 1024

export interface DiskSenderInit {
  vm: Vm
  chunkSize: number
  compress: boolean
}

export class DiskSender implements SourceStream {
  readonly name = 'disk'
  private tracker: DiskTracker | undefined
  /**
   * Chunks a round found dirty and not sent yet. A round's bitmap is gone once read, so what pending()
   * found must be sent by iterate() or, when the switch decision comes first, by the final round.
   */
  private unsent = new Set<number>()
  /** The last round QEMU reported (its rate and cost). */
  lastRound: DiskDirtyRound | undefined
  private finalChunks: Array<{ index: number; data: Buffer }> = []
  private closed = false
  /** What the overlay held at the start (written by the guest), bytes. */
  writtenAtStart = 0
  /** Chunks the destination already held (not sent). */
  dedupChunks = 0
  /** Disk bytes put in 'data' messages (after compression). */
  sentBytes = 0
  /** Disk bytes read from QEMU (bulk, rounds, final). */
  readBytes = 0
  /** The destination started from the disk the VM left there (only what changed since was offered). */
  seeded = false
  /** The move whose arrival the disk counts writes since (claim()). */
  private since: string | undefined
  /** This move's session id (the previous disk kept here is named after it). */
  private sid: string | undefined

  constructor(private readonly init: DiskSenderInit) {}

  private get t(): DiskTracker {
    if (this.tracker === undefined) throw new Error('DiskSender: bulk() has not run')
    return this.tracker
  }

  private async send(m: DiskMessage, ctx: SourceContext): Promise<void> {
    // Encoded once, in place behind the migration header (a 'data' message is ~200 KiB).
    await ctx.conv.sendRaw(encodeDiskInPlace(ctx.sid, encodeDiskMessage(m, HEADER_SIZE)), ctx.signal)
  }

  /** Reads chunks (ascending indices) in runs of consecutive ones; yields each chunk's bytes. */
  private async *readChunks(indices: number[]): AsyncGenerator<{ index: number; data: Buffer }> {
    const cs = this.init.chunkSize
    let k = 0
    while (k < indices.length) {
      const first = indices[k]!
      let n = 1
      while (k + n < indices.length && indices[k + n] === first + n && n < READ_RUN) n++
      const buf = await this.t.read(first, n)
      this.readBytes += buf.byteLength
      for (let i = 0; i < n; i++) {
        yield { index: first + i, data: buf.subarray(i * cs, Math.min((i + 1) * cs, buf.length)) }
      }
      k += n
    }
  }

  private async encode(c: { index: number; data: Buffer }): Promise<DiskChunk> {
    if (isZero(c.data)) return { index: c.index, flags: FLAG_ZERO, data: new Uint8Array(0) }
    if (this.init.compress && looksCompressible(c.data)) {
      const z = await deflateRawAsync(c.data, { level: 1 })
      if (z.byteLength < c.data.byteLength * 0.9) return { index: c.index, flags: FLAG_DEFLATED, data: z }
    }
    // A view, not a copy: each NBD read fills a buffer of its own that nothing writes again, and the
    // 'data' message's encoding copies the bytes once.
    return { index: c.index, flags: 0, data: c.data }
  }

  /** Sends chunks as 'data' messages of round `round` (encoded in the thread pool, in order). */
  private async sendData(
    chunks: AsyncIterable<{ index: number; data: Buffer }> | Iterable<{ index: number; data: Buffer }>,
    round: number,
    ctx: SourceContext,
  ): Promise<void> {
    let batch: DiskChunk[] = []
    let bytes = 0
    const flush = async () => {
      if (batch.length === 0) return
      const m: DiskMessage = { kind: 'data', round, chunks: batch }
      batch = []
      bytes = 0
      await this.send(m, ctx)
    }
    const inflight: Promise<DiskChunk>[] = []
    const take = async () => {
      const c = await inflight.shift()!
      const sz = 9 + c.data.byteLength
      if (batch.length > 0 && (bytes + sz > TARGET_BYTES || batch.length >= MAX_DISK_CHUNKS_PER_DATA))
        await flush()
      batch.push(c)
      bytes += sz
      this.sentBytes += c.data.byteLength
      ctx.carried(this.init.chunkSize)
    }
    for await (const c of chunks) {
      inflight.push(this.encode(c))
      if (inflight.length >= 8) await take()
    }
    while (inflight.length > 0) await take()
    await flush()
  }

  /**
   * The move whose arrival this disk counts the guest's writes since (vm/disk/tracker.ts markArrival),
   * for the prepare: the destination, if that move took the VM away from it and it kept the disk, starts
   * from that disk. Call before bulk().
   */
  async claim(): Promise<string | undefined> {
    this.since = await this.init.vm.diskArrival?.().catch(() => undefined)
    return this.since
  }

  async bulk(ctx: SourceContext): Promise<{ bytes: number; units: number }> {
    const { vm, chunkSize } = this.init
    this.sid = ctx.sid
    const tracker = vm.diskTracker?.({ chunkSize })
    if (tracker === undefined) throw new MigrationLinkError(`VM '${vm.spec.name}' has no disk to move`)
    this.tracker = tracker
    await tracker.open()
    // The baseline first: whatever the guest writes from here on shows up in a round (and, with a
    // claim, what it wrote since it arrived is copied in the same instant).
    await tracker.start(this.since === undefined ? {} : { since: this.since })
    await this.send({ kind: 'info', size: tracker.size, chunkSize }, ctx)
    let written: number[]
    if (this.since !== undefined) {
      const m = await ctx.conv.next(['disk'], 'disk seed', ctx.timeoutMs, ctx.signal)
      const d = decodeDiskMessage(m.body)
      if (d.kind !== 'seed') throw new MigrationLinkError(`destination answered disk info with ${d.kind}`)
      this.seeded = d.seeded
      const since = await tracker.sinceChunks()
      // Seeded: the destination's disk is this one as it was when the VM arrived here; the rest is
      // what the guest wrote since. Otherwise everything the overlay holds.
      written = d.seeded ? since : await tracker.written()
    } else written = await tracker.written()
    ctx.lap('diskScan')
    this.writtenAtStart = written.length * chunkSize
    ctx.beginPhase(this.writtenAtStart)
    // Offer a batch (hashes of what the overlay holds), send what the destination lacks, next batch.
    // The next batch is read and hashed while this one waits for its answer and goes out (NBD reads
    // are I/O in QEMU; measured: the serial loop left the link idle for half of the bulk).
    const batches = Math.ceil(written.length / OFFER_BATCH)
    let next = batches > 0 ? this.readBatch(written.slice(0, OFFER_BATCH)) : undefined
    for (let b = 0; b < batches; b++) {
      const { read, hashes } = await next!
      next =
        b + 1 < batches
          ? this.readBatch(written.slice((b + 1) * OFFER_BATCH, (b + 2) * OFFER_BATCH))
          : undefined
      // A failure of the read ahead surfaces when it is awaited; until then it must not go unhandled.
      next?.catch(() => {})
      await this.send({ kind: 'offer', batch: b, indices: read.map((c) => c.index), hashes }, ctx)
      const want = await this.nextWant(b, ctx)
      const wanted = new Set(want)
      const send = read.filter((c) => wanted.has(c.index))
      for (const c of read)
        if (!wanted.has(c.index)) {
          this.dedupChunks++
          ctx.carried(chunkSize, true)
        }
      await this.sendData(send, 0, ctx)
      // Fault tests: the source mid-way through the disk's first copy.
      if (b === 0) faultPoint('source:disk-bulk', this.init.vm.spec.name)
    }
    ctx.lap('diskBulk')
    return { bytes: this.writtenAtStart, units: written.length }
  }

  /** Reads chunks (ascending) and hashes them for an offer. */
  private async readBatch(
    indices: number[],
  ): Promise<{ read: Array<{ index: number; data: Buffer }>; hashes: Buffer }> {
    const read: Array<{ index: number; data: Buffer }> = []
    for await (const c of this.readChunks(indices)) read.push(c)
    const hashes = Buffer.alloc(read.length * DISK_HASH_SIZE)
    read.forEach((c, i) => {
      createHash('sha256')
        .update(c.data)
        .digest()
        .copy(hashes, i * DISK_HASH_SIZE)
    })
    return { read, hashes }
  }

  private async nextWant(batch: number, ctx: SourceContext): Promise<number[]> {
    const m = await ctx.conv.next(['disk'], 'disk want', ctx.timeoutMs, ctx.signal)
    const d = decodeDiskMessage(m.body)
    if (d.kind !== 'want' || d.batch !== batch)
      throw new MigrationLinkError(`destination answered disk offer ${batch} with ${d.kind}`)
    return d.indices
  }

  private takeUnsent(): number[] {
    const chunks = [...this.unsent].sort((x, y) => x - y)
    this.unsent.clear()
    return chunks
  }

  async pending(_ctx: SourceContext): Promise<PendingSet> {
    const r = await this.t.collect()
    this.lastRound = r
    for (const i of r.chunks) this.unsent.add(i)
    return {
      bytes: this.unsent.size * this.init.chunkSize,
      units: this.unsent.size,
      rateBytesPerSec: r.rateBytesPerSec,
      scanMs: r.scanMs,
    }
  }

  async iterate(round: number, ctx: SourceContext): Promise<void> {
    const chunks = this.takeUnsent()
    if (chunks.length > 0) await this.sendData(this.readChunks(chunks), round, ctx)
  }

  async finalScan(_ctx: SourceContext): Promise<number> {
    // The guest is paused and QEMU drained its I/O: this round, plus whatever an earlier round found
    // and did not send (the switch decision came first), is the rest. Read it now, while QEMU still
    // serves the disk (the device state save runs alongside).
    const r = await this.t.collect()
    for (const i of r.chunks) this.unsent.add(i)
    this.finalChunks = []
    for await (const c of this.readChunks(this.takeUnsent())) this.finalChunks.push(c)
    return this.finalChunks.length
  }

  async sendFinal(round: number, ctx: SourceContext): Promise<void> {
    const chunks = this.finalChunks
    this.finalChunks = []
    ctx.beginPhase(chunks.length * this.init.chunkSize)
    await this.sendData(chunks, round, ctx)
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    // Closed before the source stops its copy after a move (the guest is paused then): keep the disk
    // here as the VM's previous disk, so a move back sends only what changed. A rollback resumes the
    // guest, which undoes this.
    this.init.vm.retainVolumeOnStop?.(this.sid)
    const t = this.tracker
    this.tracker = undefined
    await t?.close().catch(() => {})
  }
}

const ZEROS = Buffer.alloc(128 * 1024)
function isZero(b: Buffer): boolean {
  return b.length <= ZEROS.length ? b.equals(ZEROS.subarray(0, b.length)) : b.every((x) => x === 0)
}
