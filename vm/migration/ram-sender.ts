/**
 * The source side of guest RAM (a SourceStream): offers the hashes of the non-zero chunks, sends what the
 * destination lacks, then each round what the dirty tracker found, and in the pause the exact rest
 * (RamEncoder.finalDelta). Encoded chunks travel in 'data' messages, deflated in the thread pool a batch
 * at a time, several batches in flight, sent in order.
 */
import { throwIfAborted } from '../../src/base/errors.ts'
import type { DirtyRound, DirtyTracker, Vm } from '../driver/interfaces.ts'
import { MigrationLinkError } from './errors.ts'
import { PAGE_SIZE, RamEncoder } from './ram.ts'
import type { PendingSet, SourceContext, SourceStream } from './stream.ts'
import {
  type EncodedChunk,
  encodeDataMessage,
  encodeMessage,
  HASH_SIZE,
  MAX_CHUNKS_PER_DATA,
  MAX_OFFER_ENTRIES,
  MAX_WIRE_MESSAGE,
  TARGET_MESSAGE_BYTES,
} from './v1/messages.ts'

export interface RamSenderInit {
  vm: Vm
  chunkSize: number
  compress: boolean
}

/** The first offer's entries (16 MiB of 64 KiB chunks); each next offer doubles, up to MAX_OFFER_ENTRIES. */
const FIRST_OFFER_ENTRIES = 256

/** Bytes a chunk takes in a 'data' body (index, flags, kinds, refs, literal). */
const chunkWireSize = (c: EncodedChunk) => 10 + c.kinds.length + c.refs.length * 4 + c.literal.byteLength

/** What one probe of the dirty tracker found. */
export interface ProbeResult {
  dirtyBytes: number
  intervalMs: number
  scanMs: number
}

export class RamSender implements SourceStream {
  readonly name = 'ram'
  private tracker: DirtyTracker | undefined
  private encoder: RamEncoder | undefined
  private last: DirtyRound | undefined
  private finalSet: number[] = []
  private closed = false
  /** Non-zero RAM at the start (the bulk scan). */
  ramAtStart = 0
  /** Chunks the destination filled from its cache in the bulk copy. */
  dedupChunks = 0
  /** Batches in a row that did not compress, and how many more to send plain. */
  private zSkip = 0
  private zFails = 0
  /** Chunks found dirty since the last round boundary by probes during the bulk copy. */
  private readonly deferred = new Set<number>()
  /** How often each chunk was found dirty during the move (post-copy's order). */
  private readonly heat = new Map<number, number>()
  private probing: Promise<ProbeResult | undefined> | undefined
  private inBulk = false
  /** Bytes the bulk copy still has to send (the destination lacked them), deferred ones excluded. */
  bulkRemainingBytes = 0

  constructor(private readonly init: RamSenderInit) {}

  /** 4 KiB pages sent as references to pages the destination already held. */
  get dupPageBytes(): number {
    return (this.encoder?.stats.dupPages ?? 0) * PAGE_SIZE
  }

  /** Distinct RAM found dirty during the move so far (the guest's working set as far as seen). */
  get hotBytes(): number {
    return this.heat.size * this.init.chunkSize
  }

  /** Bytes found dirty and not sent since (deferred in the bulk copy, or dirty after it was sent). */
  get deferredBytes(): number {
    return this.deferred.size * this.init.chunkSize
  }

  /** The final scan's chunks (the rest, with the guest paused): post-copy owes these. */
  get finalChunks(): readonly number[] {
    return this.finalSet
  }

  /** Chunks in the order post-copy pushes them: hottest first (found dirty most often), then by index. */
  hottestFirst(chunks: readonly number[]): number[] {
    return [...chunks].sort((a, b) => (this.heat.get(b) ?? 0) - (this.heat.get(a) ?? 0) || a - b)
  }

  private noteDirty(chunks: readonly number[]): void {
    for (const c of chunks) this.heat.set(c, (this.heat.get(c) ?? 0) + 1)
  }

  /**
   * Measures what the guest dirtied since the last probe or round (during the bulk copy: the estimator's
   * dirty rate) and defers those chunks out of the bulk copy. Undefined before the tracker started.
   */
  probe(signal?: AbortSignal): Promise<ProbeResult | undefined> {
    const tracker = this.tracker
    if (tracker === undefined || !this.inBulk) return Promise.resolve(undefined)
    this.probing ??= tracker
      .collect(signal)
      .then((r) => {
        this.noteDirty(r.chunks)
        for (const c of r.chunks) {
          // Only chunks the bulk copy still has to send are left out of it; one already sent or filled
          // from the destination's cache is simply dirty again (the next pass sends it).
          const unsent = this.scanIndex.has(c) && !this.sent.has(c)
          if (unsent && !this.deferred.has(c)) {
            this.bulkRemainingBytes -= this.init.chunkSize
            this.encoder?.deferUnsent(c)
          }
          this.deferred.add(c)
        }
        return { dirtyBytes: r.dirtyBytes, intervalMs: r.intervalMs, scanMs: r.scanMs }
      })
      .finally(() => {
        this.probing = undefined
      })
    return this.probing
  }

  /** Chunks the bulk copy still plans to send (wanted by the destination) and those it sent. */
  private readonly scanIndex = new Set<number>()
  private readonly sent = new Set<number>()

  private get enc(): RamEncoder {
    if (this.encoder === undefined) throw new Error('RamSender: bulk() has not run')
    return this.encoder
  }

  async bulk(ctx: SourceContext): Promise<{ bytes: number; units: number }> {
    const { vm, chunkSize } = this.init
    const { conv, sid, signal } = ctx
    // The tracker's baseline comes first: anything written after it is caught by a round.
    this.tracker = vm.dirtyTracker({ chunkSize })
    await this.tracker.start(signal)
    ctx.lap('trackerStart')
    this.encoder = new RamEncoder(vm.memory.path, vm.memory.size, chunkSize, false)
    const enc = this.encoder
    const scan = await enc.scan()
    ctx.lap('scan')
    this.ramAtStart = scan.nonZeroBytes
    this.inBulk = true
    this.bulkRemainingBytes = scan.nonZeroBytes
    for (const i of scan.indices) this.scanIndex.add(i)
    ctx.sending?.()
    ctx.beginPhase(scan.nonZeroBytes)
    const batches: number[][] = []
    // Small first offers, doubling: the destination answers an offer only after filling what it holds
    // from its cache, and the link idles until the first answer (a standby's first 4096 entries meant
    // seconds of reads); later answers are worked out while the earlier batches' data flows.
    let size = FIRST_OFFER_ENTRIES
    for (let i = 0; i < scan.indices.length; i += size, size = Math.min(MAX_OFFER_ENTRIES, size * 2)) {
      const indices = scan.indices.slice(i, i + size)
      batches.push(indices)
      await conv.send(
        {
          type: 'offer',
          sid,
          batch: batches.length - 1,
          indices,
          hashes: scan.hashes.subarray(i * HASH_SIZE, (i + indices.length) * HASH_SIZE),
        },
        signal,
      )
    }
    ctx.lap('offers')
    for (let b = 0; b < batches.length; b++) {
      const want = await conv.next(['want'], 'want', ctx.timeoutMs, signal)
      // The report's timings: how long the link idled for the destination's first answer.
      if (b === 0) ctx.lap('firstWant')
      const offered = batches[want.batch]
      if (offered === undefined)
        throw new MigrationLinkError(`destination answered an unknown offer ${want.batch}`)
      const wanted = new Set(want.indices)
      for (const i of offered) {
        if (!wanted.has(i)) {
          enc.markFilled(i)
          this.dedupChunks++
          ctx.carried(chunkSize, true)
          this.scanIndex.delete(i)
          if (!this.deferred.has(i)) this.bulkRemainingBytes -= chunkSize
        }
      }
      await this.sendChunks(
        want.indices.filter((i) => i >= 0 && i < enc.chunkCount),
        0,
        ctx,
      )
    }
    await this.probing
    this.inBulk = false
    this.bulkRemainingBytes = 0
    return { bytes: scan.nonZeroBytes, units: scan.indices.length }
  }

  async pending(ctx: SourceContext): Promise<PendingSet> {
    if (this.tracker === undefined) throw new Error('RamSender: bulk() has not run')
    const r = await this.tracker.collect(ctx.signal)
    this.noteDirty(r.chunks)
    // What probes deferred during the bulk copy goes with this round's set.
    if (this.deferred.size > 0) {
      for (const c of r.chunks) this.deferred.add(c)
      const chunks = [...this.deferred].sort((a, b) => a - b)
      this.deferred.clear()
      this.last = { ...r, chunks, dirtyBytes: chunks.length * r.chunkSize }
    } else this.last = r
    return {
      bytes: this.last.dirtyBytes,
      units: this.last.chunks.length,
      rateBytesPerSec: r.rateBytesPerSec,
      scanMs: r.scanMs,
    }
  }

  async iterate(round: number, ctx: SourceContext): Promise<void> {
    const r = this.last
    this.last = undefined
    if (r !== undefined) await this.sendChunks(r.chunks, round, ctx)
  }

  async finalScan(_ctx: SourceContext): Promise<number> {
    // Against what the destination holds, not from the tracker (see RamEncoder.finalDelta).
    this.finalSet = await this.enc.finalDelta(this.init.vm.memory.path)
    return this.finalSet.length
  }

  async sendFinal(round: number, ctx: SourceContext): Promise<void> {
    ctx.beginPhase(this.finalSet.length * this.init.chunkSize)
    await this.sendChunks(this.finalSet, round, ctx)
  }

  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    const tracker = this.tracker
    this.tracker = undefined
    this.encoder?.close()
    await tracker?.close().catch(() => {})
  }

  /** 'data' messages of plain chunks, each at most TARGET_MESSAGE_BYTES. */
  private plainMessages(sid: string, r: number, chunks: EncodedChunk[]): Uint8Array[] {
    const out: Uint8Array[] = []
    let batch: EncodedChunk[] = []
    let bytes = 0
    for (const c of chunks) {
      const sz = chunkWireSize(c)
      if (batch.length > 0 && bytes + sz > TARGET_MESSAGE_BYTES) {
        out.push(encodeMessage({ type: 'data', sid, round: r, chunks: batch }))
        batch = []
        bytes = 0
      }
      batch.push(c)
      bytes += sz
    }
    if (batch.length > 0) out.push(encodeMessage({ type: 'data', sid, round: r, chunks: batch }))
    return out
  }

  /**
   * One batch as messages: deflated as one message in the thread pool (fewer, larger zlib calls than per
   * chunk: measured less CPU and GC) when that pays; batches that do not compress go plain, and after a
   * run of those compression pauses for a while (random data only burns CPU).
   */
  private pack(sid: string, r: number, chunks: EncodedChunk[]): Promise<Uint8Array[]> {
    const tryZ = this.init.compress && this.zSkip === 0
    if (this.zSkip > 0) this.zSkip--
    if (!tryZ) return Promise.resolve(this.plainMessages(sid, r, chunks))
    return encodeDataMessage({ type: 'data', sid, round: r, chunks }, true).then(({ bytes, compressed }) => {
      if (compressed) this.zFails = 0
      else if (++this.zFails >= 3) {
        this.zFails = 0
        this.zSkip = 4
      }
      return compressed && bytes.byteLength <= MAX_WIRE_MESSAGE ? [bytes] : this.plainMessages(sid, r, chunks)
    })
  }

  /** Encodes and sends these chunks (ascending) as round `r`. */
  private async sendChunks(indices: number[], r: number, ctx: SourceContext): Promise<void> {
    const { conv, sid, signal } = ctx
    const enc = this.enc
    const chunkSize = this.init.chunkSize
    // Raw batches just under the link limit: whatever compresses by 10% then fits one message.
    const rawBatch = this.init.compress ? MAX_WIRE_MESSAGE - 4096 : TARGET_MESSAGE_BYTES
    const GROUP = 64
    const inflight: Promise<Uint8Array[]>[] = []
    const flushOne = async () => {
      for (const m of await inflight.shift()!) await conv.sendRaw(m, signal)
    }
    let batch: EncodedChunk[] = []
    let batchBytes = 0
    for (let g = 0; g < indices.length; g += GROUP) {
      throwIfAborted(signal)
      // The bulk copy leaves out what the guest rewrites meanwhile (probe()): it goes in a later pass.
      const group =
        r === 0
          ? indices.slice(g, g + GROUP).filter((i) => !this.deferred.has(i))
          : indices.slice(g, g + GROUP)
      if (r === 0)
        for (const i of group) {
          this.sent.add(i)
          this.bulkRemainingBytes -= chunkSize
        }
      for (const p of enc.encode(group)) {
        const c = await p
        const sz = chunkWireSize(c)
        if (batch.length > 0 && (batchBytes + sz > rawBatch || batch.length >= MAX_CHUNKS_PER_DATA)) {
          inflight.push(this.pack(sid, r, batch))
          batch = []
          batchBytes = 0
          while (inflight.length > 3) await flushOne()
        }
        batch.push(c)
        batchBytes += sz
        ctx.carried(chunkSize)
      }
    }
    if (batch.length > 0) inflight.push(this.pack(sid, r, batch))
    while (inflight.length > 0) await flushOne()
  }
}
