import { ChunkProtocolError } from '../errors.ts'
import { HASH_SIZE } from '../hash.ts'
import { MAX_CHUNK_SIZE } from '../manifest.ts'

/**
 * Chunk exchange protocol, version 1: one message per 'chunks' channel message (reliable, ordered).
 * Every message starts with u8 version=1, u8 type; integers are big-endian.
 *
 *   HAVE_QUERY     u32 req | u16 n | n × hash          "which of these do you hold?"
 *   HAVE_REPLY     u32 req | u16 n | ⌈n/8⌉ bitmap      bit i (LSB first) = holds hash i of the query
 *   WANT           u16 n | n × hash                     "send me these" (answered by BLOCKS/DONT_HAVE)
 *   BLOCKS         u16 n | n × (hash | u32 len | bytes) verified by the receiver against the hash
 *   DONT_HAVE      u16 n | n × hash
 *   CANCEL         u16 n | n × hash                     drop these from the sender's queue (fetch ended)
 *   MANIFEST_GET   u32 req | 32-byte manifest id
 *   MANIFEST_DATA  u32 req | u8 found | u32 total | u32 offset | bytes   (a slice of the encoding)
 *   IMAGE_QUERY    u32 req | u16 len | utf8 "name:tag"
 *   IMAGE_REPLY    u32 req | u8 found | u32 len | bytes (the image record)
 *
 * Decoding is defensive: lengths are checked against the message and the limits below before use, and
 * any violation throws ChunkProtocolError (the service then ignores the message and logs the peer).
 */
export const PROTOCOL_VERSION = 1

export const MsgType = {
  HaveQuery: 1,
  HaveReply: 2,
  Want: 3,
  Blocks: 4,
  DontHave: 5,
  Cancel: 6,
  ManifestGet: 7,
  ManifestData: 8,
  ImageQuery: 9,
  ImageReply: 10,
} as const

/** Most hashes in one list message (4096 × 32 = 128 KiB, well under the 256 KiB message limit). */
export const MAX_HASHES = 4096
export const MAX_IMAGE_REF = 512
export const MAX_IMAGE_RECORD = 128 * 1024
/** Manifest bytes per MANIFEST_DATA message. */
export const MANIFEST_SLICE = 192 * 1024

/** Bytes of a BLOCKS message around its blocks (version, type, count) and per block (hash, length). */
export const BLOCKS_OVERHEAD = 4
export const BLOCK_HEADER = HASH_SIZE + 4

/**
 * Lays out a BLOCKS message for chunks of the given lengths: header, hashes and lengths written, each
 * chunk's bytes left as a slot for the caller to fill in place (the server reads them straight from
 * disk into the message: no per-chunk buffer, no copy).
 */
export function allocBlocks(blocks: readonly { hash: Uint8Array; length: number }[]): {
  message: Buffer
  slots: Buffer[]
} {
  let len = BLOCKS_OVERHEAD
  for (const b of blocks) {
    if (b.length > MAX_CHUNK_SIZE) throw new RangeError('block larger than MAX_CHUNK_SIZE')
    len += BLOCK_HEADER + b.length
  }
  const message = Buffer.allocUnsafe(len)
  message[0] = PROTOCOL_VERSION
  message[1] = MsgType.Blocks
  message.writeUInt16BE(blocks.length, 2)
  const slots: Buffer[] = []
  let o = BLOCKS_OVERHEAD
  for (const b of blocks) {
    if (b.hash.byteLength !== HASH_SIZE) throw new RangeError('hash must be 32 bytes')
    message.set(b.hash, o)
    message.writeUInt32BE(b.length, o + HASH_SIZE)
    slots.push(message.subarray(o + BLOCK_HEADER, o + BLOCK_HEADER + b.length))
    o += BLOCK_HEADER + b.length
  }
  return { message, slots }
}

export interface Block {
  hash: Uint8Array
  data: Uint8Array
}

export type ChunkMessage =
  | { type: 'have-query'; req: number; hashes: Uint8Array[] }
  | { type: 'have-reply'; req: number; have: boolean[] }
  | { type: 'want'; hashes: Uint8Array[] }
  | { type: 'blocks'; blocks: Block[] }
  | { type: 'dont-have'; hashes: Uint8Array[] }
  | { type: 'cancel'; hashes: Uint8Array[] }
  | { type: 'manifest-get'; req: number; id: Uint8Array }
  | { type: 'manifest-data'; req: number; found: boolean; total: number; offset: number; data: Uint8Array }
  | { type: 'image-query'; req: number; ref: string }
  | { type: 'image-reply'; req: number; found: boolean; record: Uint8Array }

function header(type: number, bodyLength: number): Buffer {
  const b = Buffer.allocUnsafe(2 + bodyLength)
  b[0] = PROTOCOL_VERSION
  b[1] = type
  return b
}

function hashList(type: number, hashes: readonly Uint8Array[], req?: number): Uint8Array {
  if (hashes.length > MAX_HASHES) throw new RangeError(`at most ${MAX_HASHES} hashes per message`)
  const pre = req === undefined ? 0 : 4
  const b = header(type, pre + 2 + hashes.length * HASH_SIZE)
  if (req !== undefined) b.writeUInt32BE(req, 2)
  b.writeUInt16BE(hashes.length, 2 + pre)
  let o = 4 + pre
  for (const h of hashes) {
    if (h.byteLength !== HASH_SIZE) throw new RangeError('hash must be 32 bytes')
    b.set(h, o)
    o += HASH_SIZE
  }
  return b
}

export function encode(msg: ChunkMessage): Uint8Array {
  switch (msg.type) {
    case 'have-query':
      return hashList(MsgType.HaveQuery, msg.hashes, msg.req)
    case 'want':
      return hashList(MsgType.Want, msg.hashes)
    case 'dont-have':
      return hashList(MsgType.DontHave, msg.hashes)
    case 'cancel':
      return hashList(MsgType.Cancel, msg.hashes)
    case 'have-reply': {
      if (msg.have.length > MAX_HASHES) throw new RangeError('have-reply too long')
      const b = header(MsgType.HaveReply, 6 + Math.ceil(msg.have.length / 8))
      b.writeUInt32BE(msg.req, 2)
      b.writeUInt16BE(msg.have.length, 6)
      b.fill(0, 8)
      msg.have.forEach((v, i) => {
        if (v) b[8 + (i >> 3)]! |= 1 << (i & 7)
      })
      return b
    }
    case 'blocks': {
      let len = 2
      for (const blk of msg.blocks) len += HASH_SIZE + 4 + blk.data.byteLength
      const b = header(MsgType.Blocks, len)
      b.writeUInt16BE(msg.blocks.length, 2)
      let o = 4
      for (const blk of msg.blocks) {
        if (blk.data.byteLength > MAX_CHUNK_SIZE) throw new RangeError('block larger than MAX_CHUNK_SIZE')
        b.set(blk.hash, o)
        b.writeUInt32BE(blk.data.byteLength, o + HASH_SIZE)
        b.set(blk.data, o + HASH_SIZE + 4)
        o += HASH_SIZE + 4 + blk.data.byteLength
      }
      return b
    }
    case 'manifest-get': {
      const b = header(MsgType.ManifestGet, 4 + HASH_SIZE)
      b.writeUInt32BE(msg.req, 2)
      b.set(msg.id, 6)
      return b
    }
    case 'manifest-data': {
      if (msg.data.byteLength > MANIFEST_SLICE) throw new RangeError('manifest slice too large')
      const b = header(MsgType.ManifestData, 13 + msg.data.byteLength)
      b.writeUInt32BE(msg.req, 2)
      b[6] = msg.found ? 1 : 0
      b.writeUInt32BE(msg.total, 7)
      b.writeUInt32BE(msg.offset, 11)
      b.set(msg.data, 15)
      return b
    }
    case 'image-query': {
      const ref = Buffer.from(msg.ref, 'utf8')
      if (ref.byteLength > MAX_IMAGE_REF) throw new RangeError('image reference too long')
      const b = header(MsgType.ImageQuery, 6 + ref.byteLength)
      b.writeUInt32BE(msg.req, 2)
      b.writeUInt16BE(ref.byteLength, 6)
      b.set(ref, 8)
      return b
    }
    case 'image-reply': {
      if (msg.record.byteLength > MAX_IMAGE_RECORD) throw new RangeError('image record too large')
      const b = header(MsgType.ImageReply, 9 + msg.record.byteLength)
      b.writeUInt32BE(msg.req, 2)
      b[6] = msg.found ? 1 : 0
      b.writeUInt32BE(msg.record.byteLength, 7)
      b.set(msg.record, 11)
      return b
    }
  }
}

/** Reads a message; subarrays alias `bytes` (the channel hands each message over as its own copy). */
export function decode(bytes: Uint8Array): ChunkMessage {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  const need = (n: number, what: string) => {
    if (b.byteLength < n) throw new ChunkProtocolError(`truncated ${what} message (${b.byteLength} bytes)`)
  }
  need(2, 'chunk')
  if (b[0] !== PROTOCOL_VERSION) throw new ChunkProtocolError(`unsupported chunk protocol version ${b[0]}`)
  const type = b[1]
  const readHashes = (at: number, what: string): Uint8Array[] => {
    need(at + 2, what)
    const n = b.readUInt16BE(at)
    if (n > MAX_HASHES) throw new ChunkProtocolError(`${what}: ${n} hashes over the limit ${MAX_HASHES}`)
    if (b.byteLength !== at + 2 + n * HASH_SIZE) throw new ChunkProtocolError(`${what}: length mismatch`)
    const out: Uint8Array[] = []
    for (let i = 0; i < n; i++) out.push(b.subarray(at + 2 + i * HASH_SIZE, at + 2 + (i + 1) * HASH_SIZE))
    return out
  }
  switch (type) {
    case MsgType.HaveQuery:
      need(6, 'have-query')
      return { type: 'have-query', req: b.readUInt32BE(2), hashes: readHashes(6, 'have-query') }
    case MsgType.Want:
      return { type: 'want', hashes: readHashes(2, 'want') }
    case MsgType.DontHave:
      return { type: 'dont-have', hashes: readHashes(2, 'dont-have') }
    case MsgType.Cancel:
      return { type: 'cancel', hashes: readHashes(2, 'cancel') }
    case MsgType.HaveReply: {
      need(8, 'have-reply')
      const n = b.readUInt16BE(6)
      if (n > MAX_HASHES) throw new ChunkProtocolError('have-reply over the limit')
      if (b.byteLength !== 8 + Math.ceil(n / 8)) throw new ChunkProtocolError('have-reply: length mismatch')
      const have: boolean[] = []
      for (let i = 0; i < n; i++) have.push((b[8 + (i >> 3)]! & (1 << (i & 7))) !== 0)
      return { type: 'have-reply', req: b.readUInt32BE(2), have }
    }
    case MsgType.Blocks: {
      need(4, 'blocks')
      const n = b.readUInt16BE(2)
      const blocks: Block[] = []
      let o = 4
      for (let i = 0; i < n; i++) {
        need(o + HASH_SIZE + 4, 'blocks')
        const len = b.readUInt32BE(o + HASH_SIZE)
        if (len > MAX_CHUNK_SIZE) throw new ChunkProtocolError(`block of ${len} bytes over the limit`)
        need(o + HASH_SIZE + 4 + len, 'blocks')
        blocks.push({
          hash: b.subarray(o, o + HASH_SIZE),
          data: b.subarray(o + HASH_SIZE + 4, o + HASH_SIZE + 4 + len),
        })
        o += HASH_SIZE + 4 + len
      }
      if (o !== b.byteLength) throw new ChunkProtocolError('blocks: trailing bytes')
      return { type: 'blocks', blocks }
    }
    case MsgType.ManifestGet:
      if (b.byteLength !== 6 + HASH_SIZE) throw new ChunkProtocolError('manifest-get: length mismatch')
      return { type: 'manifest-get', req: b.readUInt32BE(2), id: b.subarray(6) }
    case MsgType.ManifestData: {
      need(15, 'manifest-data')
      const found = b[6]
      if (found !== 0 && found !== 1) throw new ChunkProtocolError('manifest-data: bad flag')
      const data = b.subarray(15)
      if (data.byteLength > MANIFEST_SLICE) throw new ChunkProtocolError('manifest-data: slice too large')
      const total = b.readUInt32BE(7)
      const offset = b.readUInt32BE(11)
      if (offset + data.byteLength > total) throw new ChunkProtocolError('manifest-data: slice past the end')
      return { type: 'manifest-data', req: b.readUInt32BE(2), found: found === 1, total, offset, data }
    }
    case MsgType.ImageQuery: {
      need(8, 'image-query')
      const len = b.readUInt16BE(6)
      if (len > MAX_IMAGE_REF || b.byteLength !== 8 + len)
        throw new ChunkProtocolError('image-query: bad length')
      const ref = new TextDecoder('utf-8', { fatal: true })
      try {
        return { type: 'image-query', req: b.readUInt32BE(2), ref: ref.decode(b.subarray(8)) }
      } catch (err) {
        throw new ChunkProtocolError('image-query: reference is not UTF-8', { cause: err })
      }
    }
    case MsgType.ImageReply: {
      need(11, 'image-reply')
      const found = b[6]
      if (found !== 0 && found !== 1) throw new ChunkProtocolError('image-reply: bad flag')
      const len = b.readUInt32BE(7)
      if (len > MAX_IMAGE_RECORD || b.byteLength !== 11 + len)
        throw new ChunkProtocolError('image-reply: bad length')
      return { type: 'image-reply', req: b.readUInt32BE(2), found: found === 1, record: b.subarray(11) }
    }
    default:
      throw new ChunkProtocolError(`unknown chunk message type ${type}`)
  }
}
