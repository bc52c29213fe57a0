/**
 * How guest RAM travels: chunks (default 64 KiB, the unit of dirty tracking and of the destination's
 * cache) encoded page by page (4 KiB): a zero page costs nothing, a page the destination already holds
 * somewhere (a duplicate, or its own unchanged bytes) costs a reference, only the rest travels as bytes,
 * raw-deflated when that pays. Measured on the test guest after boot: 92 MiB of non-zero 4 KiB pages,
 * of which only 62 MiB distinct, and deflate level 1 halves what remains.
 *
 * The source mirrors what the destination's RAM file holds (a content key per page) so that it only
 * references pages the destination has. The destination applies chunks strictly in message order, so
 * both sides agree on every page at every point of the stream.
 */
import { createHash } from 'node:crypto'
import { closeSync, openSync, readSync, writeSync } from 'node:fs'
import { promisify } from 'node:util'
import { deflateRaw, inflateRawSync } from 'node:zlib'
import { MigrationDecodeError } from './errors.ts'
import { HeldChunks, ScanWorker, scanRange, zeroOf } from './final-scan.ts'
import { type EncodedChunk, PAGE_KEEP, PAGE_LITERAL, PAGE_REF, PAGE_ZERO } from './v1/messages.ts'

const deflateRawAsync = promisify(deflateRaw)

export const PAGE_SIZE = 4096
const ZERO_KEY = ''
/**
 * The key of a page the destination filled from its cache (markFilled): never computed unless needed.
 * Not base64, so it equals no SHA-256 key, and it is never a holder (no reference points at such a page).
 */
const FILLED_KEY = '*'
const zeroPage = Buffer.alloc(PAGE_SIZE)

/** A chunk of zeros: one memcmp against a zero chunk (per-page subarrays cost ~40% more). */
function isZero(b: Buffer): boolean {
  return b.equals(zeroOf(b.byteLength))
}

function pageKey(page: Buffer): string {
  // Full SHA-256: a collision would silently corrupt guest memory, so no truncation.
  return createHash('sha256').update(page).digest('base64')
}

function readFully(fd: number, buf: Buffer, len: number, pos: number): void {
  let done = 0
  while (done < len) {
    const n = readSync(fd, buf, done, len - done, pos + done)
    if (n === 0) {
      buf.fill(0, done, len)
      return
    }
    done += n
  }
}

export interface ScanResult {
  /** Indices of non-zero chunks, ascending. */
  indices: number[]
  /** Their SHA-256, 32 bytes each (the chunk store's names). */
  hashes: Uint8Array
  nonZeroBytes: number
}

export interface EncodeStats {
  literalBytes: number
  dupPages: number
  keepPages: number
  zeroPages: number
  /** Pages whose SHA-256 key was computed (markFilled computes none; encode one per non-zero page). */
  hashedPages: number
}

/** The source side: reads the (running or paused) guest RAM file and encodes chunks. */
export class RamEncoder {
  readonly pagesPerChunk: number
  private readonly fd: number
  /** What the destination's page holds: a content key ('' = zeros), as of the stream sent so far. */
  private readonly destKey: string[]
  /** A page index on the destination that holds each content key. */
  private readonly holder = new Map<string, number>()
  /** Chunks offered in the bulk scan, until the destination says it had them or not. */
  private readonly offered = new Set<number>()
  /** The bytes the scan read, per non-zero chunk, until the bulk copy sent them: the bulk sends what
   *  was hashed (no second read, no second hashing); later changes are the dirty tracker's business,
   *  whose baseline was taken before the scan. */
  private readonly scanned = new Map<number, Buffer>()
  /**
   * Exactly what the destination's RAM holds, per chunk that is not all zeros there (views into read
   * buffers that are never reused). The final delta is computed against it while the guest is paused,
   * instead of trusting the dirty tracker: a compare-based tracker takes its baseline at collect()
   * time but we read the chunk later, so a chunk written and then restored to its baseline bytes in
   * between would look clean while the destination holds the intermediate bytes (a lock word taken
   * at read time would hang the guest after the move).
   */
  private readonly held: HeldChunks
  /** Scans half of the RAM at the final delta (large guests only; see final-scan.ts). */
  private readonly worker: ScanWorker | undefined
  /** Chunks deferred out of the bulk copy and not sent since (see deferUnsent). */
  private readonly deferred = new Set<number>()
  /** Adaptive compression: after a run of chunks that did not compress, skip a stretch. */
  private compressFails = 0
  private compressSkip = 0
  /**
   * Chunks the destination filled from its cache and that were not sent since: the bytes it holds, as
   * views into the scan's own 1 MiB blocks. Their pages' keys are FILLED_KEY until the chunk is encoded
   * again, and encode compares against these bytes instead: a standby move fills hundreds of MB this way,
   * and hashing each page (a second SHA-256 pass after the scan's) cost the source's main thread ~0.5 s
   * per 300 MB in the middle of the bulk copy, for chunks mostly never sent again.
   * Never views into `held`: encode()'s read path overwrites held (held.set) before it encodes, so a held
   * view would compare the new bytes with themselves and keep stale pages on the destination. The price:
   * these blocks outlive releaseScan() (up to the filled bytes, until re-encoded or close()).
   */
  private readonly filled = new Map<number, Buffer>()
  readonly stats: EncodeStats = { literalBytes: 0, dupPages: 0, keepPages: 0, zeroPages: 0, hashedPages: 0 }

  constructor(
    path: string,
    readonly size: number,
    readonly chunkSize: number,
    private readonly compress: boolean,
    /** A second thread for the final scan: default from 32 MiB of RAM up. */
    parallelScan = size >= 32 * 1024 * 1024,
  ) {
    if (chunkSize % PAGE_SIZE !== 0 || size % chunkSize !== 0)
      throw new RangeError(
        `RAM size ${size} must be a multiple of the chunk size ${chunkSize} (of 4 KiB pages)`,
      )
    this.pagesPerChunk = chunkSize / PAGE_SIZE
    this.fd = openSync(path, 'r')
    this.destKey = new Array<string>(size / PAGE_SIZE).fill(ZERO_KEY)
    this.held = new HeldChunks(size, chunkSize)
    this.worker = parallelScan ? new ScanWorker(this.held) : undefined
  }

  get chunkCount(): number {
    return this.size / this.chunkSize
  }

  close(): void {
    this.filled.clear()
    closeSync(this.fd)
    void this.worker?.close()
  }

  /**
   * Reads the whole file once: the non-zero chunks, and their hashes. Yields to the
   * event loop after every block: the agent's tunnel switch runs in the same process, and a scan of
   * 256 MiB in one go stalled the guest's TCP connections for seconds (measured up to 2.6 s).
   */
  async scan(): Promise<ScanResult> {
    // 1 MiB blocks, a fresh one each time: the non-zero chunks kept for the bulk copy are views into
    // them (no copy), and a block without any non-zero chunk is garbage at once.
    const block = Math.max(this.chunkSize, Math.floor((1024 * 1024) / this.chunkSize) * this.chunkSize)
    const indices: number[] = []
    const hashes: Buffer[] = []
    for (let pos = 0; pos < this.size; pos += block) {
      const len = Math.min(block, this.size - pos)
      const buf = Buffer.allocUnsafeSlow(len)
      readFully(this.fd, buf, len, pos)
      for (let off = 0; off < len; off += this.chunkSize) {
        const chunk = buf.subarray(off, off + this.chunkSize)
        if (isZero(chunk)) continue
        const index = (pos + off) / this.chunkSize
        indices.push(index)
        this.scanned.set(index, chunk)
        this.held.set(index, chunk)
        hashes.push(createHash('sha256').update(chunk).digest())
        // Page keys come later: encode() computes them for a chunk it sends (one the destination had
        // gets them only if it is sent again, see markFilled). Here they cost a SHA-256 per page before
        // the first offer, while the link sat idle (measured: ~1.5 s of a 1 GiB guest's 2.2 s scan).
        this.offered.add(index)
      }
      await new Promise<void>((resolve) => setImmediate(resolve))
    }
    return { indices, hashes: Buffer.concat(hashes), nonZeroBytes: indices.length * this.chunkSize }
  }

  /** The destination filled this offered chunk from its cache: its pages now hold the scanned bytes. */
  markFilled(index: number): void {
    const bytes = this.scanned.get(index)
    // A deferred chunk it filled from its cache: it holds the scanned bytes after all.
    if (this.deferred.delete(index) && bytes !== undefined) this.held.set(index, bytes)
    this.scanned.delete(index)
    if (!this.offered.delete(index) || bytes === undefined) return
    this.filled.set(index, bytes)
    const first = index * this.pagesPerChunk
    for (let i = 0; i < this.pagesPerChunk; i++) this.setDest(first + i, FILLED_KEY)
  }

  private setDest(page: number, key: string): void {
    const old = this.destKey[page]!
    if (old !== ZERO_KEY && this.holder.get(old) === page) this.holder.delete(old)
    this.destKey[page] = key
    if (key !== ZERO_KEY && key !== FILLED_KEY) this.holder.set(key, page)
  }

  /**
   * Encodes the current bytes of these chunks (ascending, no duplicates) and updates the mirror as if
   * the destination applied them in this order. Compression runs in the thread pool; the caller sends
   * the chunks in the order returned.
   */
  encode(indices: number[]): Promise<EncodedChunk>[] {
    const out: Promise<EncodedChunk>[] = []
    const maxRun = Math.max(1, Math.floor((4 * 1024 * 1024) / this.chunkSize))
    let k = 0
    while (k < indices.length) {
      // A deferred chunk goes with its current bytes (read below), not the scanned ones.
      if (this.deferred.delete(indices[k]!)) {
        this.scanned.delete(indices[k]!)
        this.offered.delete(indices[k]!)
      }
      const fromScan = this.scanned.get(indices[k]!)
      if (fromScan !== undefined) {
        const index = indices[k]!
        this.scanned.delete(index)
        // held has these bytes since scan()
        out.push(this.encodeOne(index, fromScan))
        k++
        continue
      }
      const first = indices[k]!
      let last = first
      while (k + 1 < indices.length && indices[k + 1] === last + 1 && last - first + 1 < maxRun)
        last = indices[++k]!
      k++
      const buf = Buffer.allocUnsafe((last - first + 1) * this.chunkSize)
      readFully(this.fd, buf, buf.byteLength, first * this.chunkSize)
      for (let i = first; i <= last; i++) {
        const chunk = buf.subarray((i - first) * this.chunkSize, (i - first + 1) * this.chunkSize)
        // What the destination holds once it applied this chunk (buf is never reused). Without this the
        // final scan compared against the bytes of the first scan and re-encoded, while the guest was
        // paused, every chunk a pre-copy round had already sent.
        this.held.set(i, chunk)
        out.push(this.encodeOne(i, chunk))
      }
    }
    return out
  }

  /**
   * A chunk deferred out of the bulk copy before it was sent (the guest rewrites it): it goes later with
   * its bytes then, never the scanned ones. Until then the destination does not hold the scanned bytes
   * (scan() assumed it would): its copy is zeros, so the final delta finds the chunk whatever the guest
   * wrote into it meanwhile — unless the destination fills it from its cache after all (markFilled).
   * (Without this, a chunk written between the tracker's baseline and the scan, and not again, was never
   * sent: measured, a guest kernel panicked on the destination.)
   */
  deferUnsent(index: number): void {
    this.deferred.add(index)
    this.held.clear(index)
  }

  /** Drops what the scan kept for the bulk copy (after it). */
  releaseScan(): void {
    this.scanned.clear()
  }

  /**
   * With the guest paused: every chunk whose bytes differ from what the destination holds (zeros for
   * chunks never sent), ascending. Exact, whatever the dirty tracker saw. Reads the whole file once,
   * the upper half on the scan worker when there is one (this thread scans it if the worker fails).
   */
  async finalDelta(path: string): Promise<number[]> {
    const count = this.chunkCount
    if (this.worker === undefined) return scanRange(path, this.held, 0, count)
    const split = Math.floor(count / 2)
    const upper = this.worker.scan(path, split, count).catch(() => scanRange(path, this.held, split, count))
    const [lower, higher] = await Promise.all([scanRange(path, this.held, 0, split), upper])
    return lower.concat(higher)
  }

  private encodeOne(index: number, chunk: Buffer): Promise<EncodedChunk> {
    const kinds = new Uint8Array(this.pagesPerChunk)
    const refs: number[] = []
    const literals: Buffer[] = []
    const firstPage = index * this.pagesPerChunk
    // Filled from the destination's cache since it was last sent: what its pages hold is these bytes
    // (their keys were never computed); all of them get real keys below.
    const filled = this.filled.get(index)
    this.filled.delete(index)
    for (let i = 0; i < this.pagesPerChunk; i++) {
      const page = chunk.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
      const p = firstPage + i
      const there = filled?.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
      if (page.equals(zeroPage)) {
        const zeroThere = there === undefined ? this.destKey[p] === ZERO_KEY : there.equals(zeroPage)
        kinds[i] = zeroThere ? PAGE_KEEP : PAGE_ZERO
        this.stats.zeroPages++
        this.setDest(p, ZERO_KEY)
        continue
      }
      const key = pageKey(page)
      this.stats.hashedPages++
      if (there === undefined ? this.destKey[p] === key : there.equals(page)) {
        kinds[i] = PAGE_KEEP
        this.stats.keepPages++
        // A filled page now has its key, and can be referenced like any other.
        if (there !== undefined) this.setDest(p, key)
        continue
      }
      const at = this.holder.get(key)
      if (at !== undefined) {
        kinds[i] = PAGE_REF
        refs.push(at)
        this.stats.dupPages++
      } else {
        kinds[i] = PAGE_LITERAL
        // Copy: the read buffer is shared by a run of chunks and compression is asynchronous.
        literals.push(Buffer.from(page))
      }
      this.setDest(p, key)
    }
    this.offered.delete(index)
    const literal = literals.length === 1 ? literals[0]! : Buffer.concat(literals)
    this.stats.literalBytes += literal.byteLength
    if (!this.compress || literal.byteLength === 0 || this.compressSkip > 0) {
      if (this.compressSkip > 0 && literal.byteLength > 0) this.compressSkip--
      return Promise.resolve({ index, deflated: false, kinds, refs, literal })
    }
    return deflateRawAsync(literal, { level: 1 }).then((z) => {
      // Incompressible pages (random data, already compressed files) travel raw; after a run of
      // them, stop trying for a while (deflating random data only burns CPU).
      if (z.byteLength < literal.byteLength * 0.9) {
        this.compressFails = 0
        return { index, deflated: true, kinds, refs, literal: z }
      }
      if (++this.compressFails >= 4) {
        this.compressFails = 0
        this.compressSkip = 64
      }
      return { index, deflated: false, kinds, refs, literal }
    })
  }
}

/** The destination side: writes chunks into its RAM file in stream order. */
export class RamWriter {
  readonly pagesPerChunk: number
  private readonly fd: number
  private readonly scratch: Buffer
  /** Bytes of RAM written so far (decoded), and how many of them came from the local cache. */
  ramBytes = 0
  cachedBytes = 0

  constructor(
    path: string,
    readonly size: number,
    readonly chunkSize: number,
  ) {
    if (chunkSize % PAGE_SIZE !== 0 || size % chunkSize !== 0) throw new RangeError('bad RAM geometry')
    this.pagesPerChunk = chunkSize / PAGE_SIZE
    this.fd = openSync(path, 'r+')
    this.scratch = Buffer.allocUnsafe(chunkSize)
  }

  close(): void {
    closeSync(this.fd)
  }

  private checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.size / this.chunkSize)
      throw new MigrationDecodeError(`chunk index ${index} outside guest RAM`)
  }

  /** A chunk from the local cache (bytes already verified against their hash). */
  fill(index: number, data: Uint8Array): void {
    this.checkIndex(index)
    if (data.byteLength !== this.chunkSize) throw new MigrationDecodeError('cached chunk has the wrong size')
    writeSync(this.fd, data, 0, data.byteLength, index * this.chunkSize)
    this.ramBytes += data.byteLength
    this.cachedBytes += data.byteLength
  }

  /** Applies one encoded chunk. */
  apply(c: EncodedChunk): void {
    this.checkIndex(c.index)
    const literal = literalPages(c, this.pagesPerChunk, 'chunk')
    const base = c.index * this.chunkSize
    const buf = this.scratch
    const firstPage = c.index * this.pagesPerChunk
    // KEEP pages and references to pages of this same chunk read the current bytes; a chunk without
    // either (most of a bulk copy) is built from scratch.
    let needOld = false
    let ri = 0
    for (let i = 0; i < this.pagesPerChunk && !needOld; i++) {
      if (c.kinds[i] === PAGE_KEEP) needOld = true
      else if (c.kinds[i] === PAGE_REF) {
        const src = c.refs[ri++]
        if (src !== undefined && src >= firstPage && src < firstPage + this.pagesPerChunk) needOld = true
      }
    }
    if (needOld) readFully(this.fd, buf, this.chunkSize, base)
    let lit = 0
    let ref = 0
    const page = Buffer.allocUnsafe(PAGE_SIZE)
    for (let i = 0; i < this.pagesPerChunk; i++) {
      const at = i * PAGE_SIZE
      switch (c.kinds[i]) {
        case PAGE_ZERO:
          buf.fill(0, at, at + PAGE_SIZE)
          break
        case PAGE_LITERAL:
          literal.copy(buf, at, lit * PAGE_SIZE, (lit + 1) * PAGE_SIZE)
          lit++
          break
        case PAGE_REF: {
          const src = c.refs[ref++]
          if (src === undefined || src >= this.size / PAGE_SIZE)
            throw new MigrationDecodeError(`page reference ${src} outside guest RAM`)
          if (src >= firstPage && src < firstPage + this.pagesPerChunk) {
            // Within this chunk: pages before i already hold their new bytes in buf; the rest still
            // hold the old ones, which is what the source's mirror assumed.
            buf.copy(page, 0, (src - firstPage) * PAGE_SIZE, (src - firstPage + 1) * PAGE_SIZE)
          } else readFully(this.fd, page, PAGE_SIZE, src * PAGE_SIZE)
          page.copy(buf, at)
          break
        }
        default:
          break
      }
    }
    if (ref !== c.refs.length) throw new MigrationDecodeError('chunk has more references than REF pages')
    writeSync(this.fd, buf, 0, this.chunkSize, base)
    this.ramBytes += this.chunkSize
  }
}

/**
 * The literal pages of an encoded chunk, inflated and checked against its page kinds (bulk/pre-copy
 * chunks and post-copy 'pcdata' share the encoding): MigrationDecodeError names `what` on any mismatch.
 */
export function literalPages(c: EncodedChunk, pages: number, what: string): Buffer {
  if (c.kinds.length !== pages)
    throw new MigrationDecodeError(`${what} has ${c.kinds.length} pages, expected ${pages}`)
  let nlit = 0
  for (const k of c.kinds) if (k === PAGE_LITERAL) nlit++
  let literal: Buffer
  if (c.deflated) {
    try {
      literal = inflateRawSync(c.literal, { maxOutputLength: Math.max(nlit * PAGE_SIZE, 1) })
    } catch (cause) {
      throw new MigrationDecodeError(`${what} literal block does not inflate`, { cause })
    }
  } else literal = Buffer.from(c.literal.buffer, c.literal.byteOffset, c.literal.byteLength)
  if (literal.byteLength !== nlit * PAGE_SIZE)
    throw new MigrationDecodeError(
      `${what} literal block holds ${literal.byteLength} bytes for ${nlit} pages`,
    )
  return literal
}
