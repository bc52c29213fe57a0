/**
 * The disk stream of a migration, version 1: the bodies of the migration protocol's 'disk' messages
 * (vm/migration/v1/messages.ts carries them on the 'migrate' channel, in order with the RAM stream).
 *
 *   [u8 version=1][u8 kind][body]          all integers big-endian
 *   info  (1): u64 size | u32 chunkSize                       the disk's geometry (first message)
 *   offer (2): u32 batch | u32 n | n × (u32 index, 32-byte SHA-256)   chunks the source's overlay holds
 *   want  (3): u32 batch | u32 n | n × u32 index             what the destination lacks of an offer
 *   data  (4): u32 round | u32 n | n × (u32 index, u8 flags, u32 len, len bytes)
 *              flags bit 0: all zeros (len 0), bit 1: raw-deflated
 *   seed  (5): u8 seeded                                       destination → source, answers 'info' when
 *              the prepare named the move whose arrival the source counts writes since (diskSince):
 *              1 = its incoming disk is the disk it kept at the end of that move, so the source offers
 *              only the chunks written since; 0 = it starts from nothing, the source offers all
 *
 * Decoding checks every length against the message and the limits below before allocating, and throws
 * MigrationDecodeError (never a crash, never an unbounded buffer).
 */
import { MigrationDecodeError } from '../../migration/errors.ts'

export const DISK_VERSION = 1
export const DISK_HASH_SIZE = 32
/** Entries per offer (36 bytes each: fits one 256 KiB link message). */
export const MAX_DISK_OFFER = 4096
export const MAX_DISK_WANT = 16384
export const MAX_DISK_CHUNKS_PER_DATA = 64
/** Largest disk accepted (16 TiB) and chunk size (128 KiB, the chunk store's limit). */
export const MAX_DISK_SIZE = 16 * 1024 ** 4
export const MAX_DISK_CHUNK = 128 * 1024

export const FLAG_ZERO = 1
export const FLAG_DEFLATED = 2

export interface DiskChunk {
  index: number
  flags: number
  /** Empty for zero chunks; deflated bytes when FLAG_DEFLATED. */
  data: Uint8Array
}

export type DiskMessage =
  | { kind: 'info'; size: number; chunkSize: number }
  | { kind: 'offer'; batch: number; indices: number[]; hashes: Uint8Array }
  | { kind: 'want'; batch: number; indices: number[] }
  | { kind: 'data'; round: number; chunks: DiskChunk[] }
  | { kind: 'seed'; seeded: boolean }

const KINDS = ['info', 'offer', 'want', 'data', 'seed'] as const

/**
 * Encodes a disk message. With `headroom`, the body starts that many bytes into the returned buffer and
 * the bytes before it are left for the caller (vm/migration/v1/messages.ts encodeDiskInPlace writes the
 * migration header there: the body, up to 200 KiB of chunk data, is not copied again).
 */
export function encodeDiskMessage(m: DiskMessage, headroom = 0): Uint8Array {
  let out: Buffer | undefined
  // `unsafe` only where every byte of the body is written below.
  const alloc = (n: number, unsafe = false): Buffer => {
    out = unsafe ? Buffer.allocUnsafe(headroom + n) : Buffer.alloc(headroom + n)
    return out.subarray(headroom)
  }
  encodeBody(m, alloc)
  return out!
}

function encodeBody(m: DiskMessage, alloc: (n: number, unsafe?: boolean) => Buffer): void {
  switch (m.kind) {
    case 'info': {
      const b = alloc(14)
      b[0] = DISK_VERSION
      b[1] = 1
      b.writeBigUInt64BE(BigInt(m.size), 2)
      b.writeUInt32BE(m.chunkSize, 10)
      return
    }
    case 'offer': {
      if (m.indices.length > MAX_DISK_OFFER || m.hashes.byteLength !== m.indices.length * DISK_HASH_SIZE)
        throw new RangeError('bad disk offer')
      const b = alloc(10 + m.indices.length * (4 + DISK_HASH_SIZE))
      b[0] = DISK_VERSION
      b[1] = 2
      b.writeUInt32BE(m.batch, 2)
      b.writeUInt32BE(m.indices.length, 6)
      let o = 10
      m.indices.forEach((idx, i) => {
        b.writeUInt32BE(idx, o)
        b.set(m.hashes.subarray(i * DISK_HASH_SIZE, (i + 1) * DISK_HASH_SIZE), o + 4)
        o += 4 + DISK_HASH_SIZE
      })
      return
    }
    case 'want': {
      if (m.indices.length > MAX_DISK_WANT) throw new RangeError('bad disk want')
      const b = alloc(10 + m.indices.length * 4)
      b[0] = DISK_VERSION
      b[1] = 3
      b.writeUInt32BE(m.batch, 2)
      b.writeUInt32BE(m.indices.length, 6)
      m.indices.forEach((idx, i) => {
        b.writeUInt32BE(idx, 10 + i * 4)
      })
      return
    }
    case 'data': {
      if (m.chunks.length > MAX_DISK_CHUNKS_PER_DATA) throw new RangeError('too many chunks in one disk data')
      let len = 10
      for (const c of m.chunks) len += 9 + c.data.byteLength
      const b = alloc(len, true)
      b[0] = DISK_VERSION
      b[1] = 4
      b.writeUInt32BE(m.round, 2)
      b.writeUInt32BE(m.chunks.length, 6)
      let o = 10
      for (const c of m.chunks) {
        b.writeUInt32BE(c.index, o)
        b[o + 4] = c.flags
        b.writeUInt32BE(c.data.byteLength, o + 5)
        b.set(c.data, o + 9)
        o += 9 + c.data.byteLength
      }
      return
    }
    case 'seed': {
      const b = alloc(3)
      b[0] = DISK_VERSION
      b[1] = 5
      b[2] = m.seeded ? 1 : 0
      return
    }
  }
}

function need(b: Buffer, o: number, n: number, what: string): void {
  if (o + n > b.byteLength) throw new MigrationDecodeError(`disk message truncated in ${what}`)
}

export function decodeDiskMessage(bytes: Uint8Array): DiskMessage {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  need(b, 0, 2, 'header')
  if (b[0] !== DISK_VERSION) throw new MigrationDecodeError(`unsupported disk stream version ${b[0]}`)
  const kind = KINDS[b[1]! - 1]
  if (kind === undefined) throw new MigrationDecodeError(`unknown disk message kind ${b[1]}`)
  switch (kind) {
    case 'info': {
      need(b, 2, 12, 'info')
      if (b.byteLength !== 14) throw new MigrationDecodeError('disk info has trailing bytes')
      const size = Number(b.readBigUInt64BE(2))
      const chunkSize = b.readUInt32BE(10)
      if (size > MAX_DISK_SIZE) throw new MigrationDecodeError(`disk of ${size} bytes is too large`)
      if (chunkSize < 4096 || chunkSize > MAX_DISK_CHUNK || (chunkSize & (chunkSize - 1)) !== 0)
        throw new MigrationDecodeError(`bad disk chunk size ${chunkSize}`)
      return { kind, size, chunkSize }
    }
    case 'offer':
    case 'want': {
      need(b, 2, 8, kind)
      const batch = b.readUInt32BE(2)
      const n = b.readUInt32BE(6)
      const per = kind === 'offer' ? 4 + DISK_HASH_SIZE : 4
      if (n > (kind === 'offer' ? MAX_DISK_OFFER : MAX_DISK_WANT))
        throw new MigrationDecodeError(`disk ${kind} of ${n} entries is too large`)
      if (b.byteLength !== 10 + n * per) throw new MigrationDecodeError(`disk ${kind} has the wrong length`)
      const indices: number[] = []
      const hashes = kind === 'offer' ? Buffer.alloc(n * DISK_HASH_SIZE) : undefined
      for (let i = 0, o = 10; i < n; i++, o += per) {
        indices.push(b.readUInt32BE(o))
        if (hashes !== undefined) b.copy(hashes, i * DISK_HASH_SIZE, o + 4, o + 4 + DISK_HASH_SIZE)
      }
      return kind === 'offer' ? { kind, batch, indices, hashes: hashes! } : { kind, batch, indices }
    }
    case 'data': {
      need(b, 2, 8, 'data')
      const round = b.readUInt32BE(2)
      const n = b.readUInt32BE(6)
      if (n > MAX_DISK_CHUNKS_PER_DATA) throw new MigrationDecodeError(`disk data of ${n} chunks`)
      const chunks: DiskChunk[] = []
      let o = 10
      for (let i = 0; i < n; i++) {
        need(b, o, 9, 'chunk header')
        const index = b.readUInt32BE(o)
        const flags = b[o + 4]!
        const len = b.readUInt32BE(o + 5)
        if (len > MAX_DISK_CHUNK) throw new MigrationDecodeError(`disk chunk of ${len} bytes`)
        if ((flags & ~(FLAG_ZERO | FLAG_DEFLATED)) !== 0)
          throw new MigrationDecodeError('unknown chunk flags')
        if ((flags & FLAG_ZERO) !== 0 && len !== 0) throw new MigrationDecodeError('zero chunk with bytes')
        need(b, o + 9, len, 'chunk bytes')
        chunks.push({ index, flags, data: b.subarray(o + 9, o + 9 + len) })
        o += 9 + len
      }
      if (o !== b.byteLength) throw new MigrationDecodeError('disk data has trailing bytes')
      return { kind, round, chunks }
    }
    case 'seed':
      if (b.byteLength !== 3 || b[2]! > 1) throw new MigrationDecodeError('bad disk seed')
      return { kind, seeded: b[2] === 1 }
  }
}
