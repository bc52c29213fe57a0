import { open } from 'node:fs/promises'
import { throwIfAborted } from '../../src/base/errors.ts'
import { ManifestDecodeError } from './errors.ts'
import { HASH_SIZE, isAllZero, isZeroHash, sha256, toHex, ZERO_HASH } from './hash.ts'
import type { ChunkStore, Manifest } from './interfaces.ts'

/**
 * Manifests: a resource (a file or a byte range of one) as size + chunk size + the ordered chunk
 * names. Binary encoding, version 1 (all integers big-endian):
 *
 *   u8 version=1 | u8 flags=0 | u32 chunkSize | u64 size | u32 count | count × 32-byte SHA-256
 *
 * count must equal ceil(size / chunkSize); a chunk of all zeros is listed as ZERO_HASH. The manifest's
 * own name is the SHA-256 of this encoding, in hex.
 */
export const MANIFEST_VERSION = 1
const HEADER = 18

export const MIN_CHUNK_SIZE = 4 * 1024
/** Largest chunk that fits in one 'chunks' message (256 KiB) with its header. */
export const MAX_CHUNK_SIZE = 128 * 1024
export const DEFAULT_CHUNK_SIZE = 64 * 1024

export interface ManifestLimits {
  /** Largest resource accepted (default 1 TiB). */
  maxSize?: number
  /** Most chunks accepted (default 2^22: a 128 MiB manifest). */
  maxChunks?: number
}

export function checkChunkSize(chunkSize: number): void {
  if (
    !Number.isInteger(chunkSize) ||
    chunkSize < MIN_CHUNK_SIZE ||
    chunkSize > MAX_CHUNK_SIZE ||
    (chunkSize & (chunkSize - 1)) !== 0
  ) {
    throw new RangeError(
      `chunk size must be a power of two between ${MIN_CHUNK_SIZE} and ${MAX_CHUNK_SIZE}, got ${chunkSize}`,
    )
  }
}

export function chunkCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize)
}

/** Builds a manifest from parts; `hashes` is count × 32 bytes (kept, not copied). */
export function makeManifest(size: number, chunkSize: number, hashes: Uint8Array): Manifest {
  checkChunkSize(chunkSize)
  const count = chunkCount(size, chunkSize)
  if (hashes.byteLength !== count * HASH_SIZE) throw new RangeError('hash list length does not match size')
  return { size, chunkSize, count, hashes }
}

export function hashAt(m: Manifest, index: number): Uint8Array {
  return m.hashes.subarray(index * HASH_SIZE, (index + 1) * HASH_SIZE)
}

export function chunkLength(m: Manifest, index: number): number {
  return Math.min(m.chunkSize, m.size - index * m.chunkSize)
}

export function isZeroAt(m: Manifest, index: number): boolean {
  return isZeroHash(hashAt(m, index))
}

export function encodeManifest(m: Manifest): Uint8Array {
  const out = Buffer.allocUnsafe(HEADER + m.hashes.byteLength)
  out[0] = MANIFEST_VERSION
  out[1] = 0
  out.writeUInt32BE(m.chunkSize, 2)
  out.writeBigUInt64BE(BigInt(m.size), 6)
  out.writeUInt32BE(m.count, 14)
  out.set(m.hashes, HEADER)
  return out
}

/** Decodes defensively: every field is checked before anything is allocated from it. */
export function decodeManifest(bytes: Uint8Array, limits: ManifestLimits = {}): Manifest {
  const maxSize = limits.maxSize ?? 2 ** 40
  const maxChunks = limits.maxChunks ?? 2 ** 22
  if (bytes.byteLength < HEADER)
    throw new ManifestDecodeError(`manifest too short (${bytes.byteLength} bytes)`)
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  if (b[0] !== MANIFEST_VERSION) throw new ManifestDecodeError(`unknown manifest version ${b[0]}`)
  if (b[1] !== 0) throw new ManifestDecodeError(`unknown manifest flags ${b[1]}`)
  const chunkSize = b.readUInt32BE(2)
  try {
    checkChunkSize(chunkSize)
  } catch (err) {
    throw new ManifestDecodeError('manifest has an invalid chunk size', { cause: err })
  }
  const bigSize = b.readBigUInt64BE(6)
  if (bigSize > BigInt(maxSize))
    throw new ManifestDecodeError(`manifest size ${bigSize} over the limit ${maxSize}`)
  const size = Number(bigSize)
  const count = b.readUInt32BE(14)
  if (count > maxChunks) throw new ManifestDecodeError(`manifest lists ${count} chunks, limit ${maxChunks}`)
  if (count !== chunkCount(size, chunkSize))
    throw new ManifestDecodeError(`manifest chunk count ${count} does not match size ${size}`)
  if (b.byteLength !== HEADER + count * HASH_SIZE)
    throw new ManifestDecodeError(`manifest length ${b.byteLength} does not match ${count} chunks`)
  // Copy: the caller's buffer (a network message) must not pin or alias the manifest.
  return { size, chunkSize, count, hashes: new Uint8Array(b.subarray(HEADER)) }
}

/** The manifest's name: hex SHA-256 of its encoding. */
export function manifestId(m: Manifest): string {
  return toHex(sha256(encodeManifest(m)))
}

/** Progress of a manifest build or update. */
export interface BuildProgress {
  bytesDone: number
  bytesTotal: number
}

export interface BuildOptions {
  chunkSize?: number
  /** Import every non-zero chunk into this store while hashing (push an image, seed a resource); the
   *  manifest is stored too. */
  store?: ChunkStore
  /** With a store: pin the manifest under this name before the build's lease on its chunks ends. */
  pin?: string
  /** Byte range of the file (default: the whole file). */
  offset?: number
  length?: number
  /** Read size (default 4 MiB, rounded to chunks): big reads, hashed as subarrays without copies. */
  readSize?: number
  signal?: AbortSignal
  onProgress?: (p: BuildProgress) => void
}

export interface BuildResult {
  manifest: Manifest
  id: string
  zeroChunks: number
  /** Chunks newly written into the store (0 without a store). */
  storedChunks: number
  storedBytes: number
}

/**
 * Streams a file (or a range) once: reads big blocks into two alternating buffers, hashes each chunk as
 * a subarray, and (with a store) writes non-zero chunks the store lacks. A buffer is refilled only
 * after the store writes that point into it have finished.
 */
export async function buildManifest(path: string, opts: BuildOptions = {}): Promise<BuildResult> {
  const chunkSize = opts.chunkSize ?? opts.store?.chunkSize ?? DEFAULT_CHUNK_SIZE
  checkChunkSize(chunkSize)
  const fh = await open(path, 'r')
  try {
    const offset = opts.offset ?? 0
    const length = opts.length ?? (await fh.stat()).size - offset
    if (offset < 0 || length < 0) throw new RangeError('byte range outside the file')
    const count = chunkCount(length, chunkSize)
    const hashes = new Uint8Array(count * HASH_SIZE)
    const readSize = Math.max(
      chunkSize,
      Math.floor((opts.readSize ?? 4 * 1024 * 1024) / chunkSize) * chunkSize,
    )
    const bufs = [Buffer.allocUnsafe(readSize), Buffer.allocUnsafe(readSize)]
    const pending: Promise<unknown>[][] = [[], []]
    const lease = opts.store?.lease()
    let zeroChunks = 0
    let storedChunks = 0
    let storedBytes = 0
    let pos = 0
    let turn = 0
    try {
      while (pos < length) {
        throwIfAborted(opts.signal)
        const buf = bufs[turn]!
        await Promise.all(pending[turn]!)
        pending[turn] = []
        const want = Math.min(readSize, length - pos)
        const got = await readFully(fh, buf, want, offset + pos)
        if (got < want) throw new RangeError(`file ${path} shrank while reading`)
        for (let off = 0; off < got; off += chunkSize) {
          const data = buf.subarray(off, Math.min(off + chunkSize, got))
          const index = (pos + off) / chunkSize
          if (isAllZero(data)) {
            zeroChunks++
            continue // hashes is zero-filled: ZERO_HASH already
          }
          const h = sha256(data)
          hashes.set(h, index * HASH_SIZE)
          if (opts.store !== undefined && lease !== undefined) {
            lease.add(h)
            if (!opts.store.has(h)) {
              storedChunks++
              storedBytes += data.byteLength
              pending[turn]!.push(opts.store.putVerified(h, data))
            }
          }
        }
        pos += got
        opts.onProgress?.({ bytesDone: pos, bytesTotal: length })
        turn ^= 1
      }
      await Promise.all([...pending[0]!, ...pending[1]!])
      const manifest = makeManifest(length, chunkSize, hashes)
      let id = manifestId(manifest)
      if (opts.store !== undefined) {
        id = await opts.store.putManifest(manifest)
        if (opts.pin !== undefined) await opts.store.pin(opts.pin, id)
      }
      return { manifest, id, zeroChunks, storedChunks, storedBytes }
    } finally {
      // The lease kept a concurrent gc() from collecting chunks the manifest (not yet pinned) lists.
      await Promise.allSettled([...pending[0]!, ...pending[1]!])
      lease?.release()
    }
  } finally {
    await fh.close()
  }
}

export interface UpdateOptions {
  /** Import the changed chunks and the new manifest into this store. */
  store?: ChunkStore
  /** With a store: pin the new manifest under this name before the lease on its chunks ends. */
  pin?: string
  /** Byte offset of the manifest's resource in the file (default 0). */
  offset?: number
  readSize?: number
  signal?: AbortSignal
}

export interface UpdateResult {
  manifest: Manifest
  id: string
  /** Indices whose hash actually changed (a dirty chunk may have been rewritten with equal bytes). */
  changed: number[]
}

/**
 * Re-hashes only the given chunk indices of a resource whose size is unchanged (migration's pre-copy
 * rounds on the guest RAM file). Adjacent indices are coalesced into one read.
 */
export async function updateManifest(
  base: Manifest,
  path: string,
  dirty: Iterable<number>,
  opts: UpdateOptions = {},
): Promise<UpdateResult> {
  const indices = [...new Set(dirty)].sort((a, b) => a - b)
  for (const i of indices) {
    if (!Number.isInteger(i) || i < 0 || i >= base.count)
      throw new RangeError(`chunk index ${i} out of range`)
  }
  const hashes = base.hashes.slice()
  const changed: number[] = []
  const offset = opts.offset ?? 0
  const cs = base.chunkSize
  const maxRun = Math.max(1, Math.floor((opts.readSize ?? 4 * 1024 * 1024) / cs))
  const buf = Buffer.allocUnsafe(maxRun * cs)
  const fh = await open(path, 'r')
  const lease = opts.store?.lease()
  try {
    let k = 0
    while (k < indices.length) {
      throwIfAborted(opts.signal)
      const first = indices[k]!
      let last = first
      while (k + 1 < indices.length && indices[k + 1] === last + 1 && last - first + 1 < maxRun) {
        k++
        last = indices[k]!
      }
      k++
      const start = first * cs
      const want = Math.min((last + 1) * cs, base.size) - start
      const got = await readFully(fh, buf, want, offset + start)
      if (got < want) throw new RangeError(`file ${path} is shorter than the manifest`)
      const puts: Promise<unknown>[] = []
      for (let i = first; i <= last; i++) {
        const data = buf.subarray((i - first) * cs, Math.min((i - first + 1) * cs, want))
        const h = isAllZero(data) ? ZERO_HASH : sha256(data)
        const at = i * HASH_SIZE
        if (!Buffer.from(hashes.buffer, hashes.byteOffset + at, HASH_SIZE).equals(h)) {
          hashes.set(h, at)
          changed.push(i)
        }
        if (opts.store !== undefined && lease !== undefined && !isZeroHash(h)) {
          lease.add(h)
          if (!opts.store.has(h)) puts.push(opts.store.putVerified(h, data))
        }
      }
      await Promise.all(puts)
    }
    const manifest = makeManifest(base.size, cs, hashes)
    let id = manifestId(manifest)
    if (opts.store !== undefined) {
      id = await opts.store.putManifest(manifest)
      if (opts.pin !== undefined) await opts.store.pin(opts.pin, id)
    }
    return { manifest, id, changed }
  } finally {
    lease?.release()
    await fh.close()
  }
}

async function readFully(
  fh: import('node:fs/promises').FileHandle,
  buf: Buffer,
  length: number,
  position: number,
): Promise<number> {
  let done = 0
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done)
    if (bytesRead === 0) break
    done += bytesRead
  }
  return done
}
