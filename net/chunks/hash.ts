import { createHash } from 'node:crypto'

/**
 * Chunk names. SHA-256 from node:crypto: measured 1.4–1.6 GB/s per core on 64 KiB chunks here (SHA-NI),
 * faster than blake3-wasm (0.8 GB/s), and needs no dependency.
 */
export const HASH_SIZE = 32

/** The name that stands for an all-zero chunk of any length. Such chunks are never stored nor sent:
 *  SHA-256 has no known preimage for 32 zero bytes, so the marker cannot collide with a real chunk. */
export const ZERO_HASH: Uint8Array = new Uint8Array(HASH_SIZE)

export function sha256(data: Uint8Array): Buffer {
  return createHash('sha256').update(data).digest()
}

export function toHex(hash: Uint8Array): string {
  return Buffer.from(hash.buffer, hash.byteOffset, hash.byteLength).toString('hex')
}

export function fromHex(hex: string): Buffer {
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new TypeError(`not a chunk name: '${hex.slice(0, 80)}'`)
  return Buffer.from(hex, 'hex')
}

export function hashEquals(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(b)
}

export function isZeroHash(hash: Uint8Array): boolean {
  return hashEquals(hash, ZERO_HASH)
}

let zeros = Buffer.alloc(256 * 1024)
/** True when every byte is zero; memcmp against a zero buffer (about as fast as memory bandwidth). */
export function isAllZero(data: Uint8Array): boolean {
  if (data.byteLength > zeros.byteLength) zeros = Buffer.alloc(data.byteLength)
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength).equals(zeros.subarray(0, data.byteLength))
}
