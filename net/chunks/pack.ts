/**
 * The pack file's record format (moved out of store.ts, which owns the index and the packs' lifecycle):
 * u32 magic 'MCK1' | u32 length | 32-byte SHA-256 | bytes, records appended back to back. scanPack()
 * walks the headers at open and finds a torn tail.
 */
import { open } from 'node:fs/promises'
import { HASH_SIZE } from './hash.ts'

/** Stored chunks may exceed the wire limit (manifests cap chunk size at MAX_CHUNK_SIZE for the wire). */
export const MAX_STORED_CHUNK = 64 * 1024 * 1024
export const MAGIC = 0x4d434b31
export const REC_HDR = 8 + HASH_SIZE

export interface PackRecord {
  hex: string
  /** Offset of the chunk bytes (after the record header). */
  offset: number
  length: number
}

export interface PackScan {
  records: PackRecord[]
  /** End of the last complete record: anything after it is a torn tail. */
  validEnd: number
  size: number
  /** Name in the header of the incomplete tail record, if its header was complete. */
  tornHex?: string
}

/** Walks a pack's record headers (without reading chunk bytes). */
export async function scanPack(path: string): Promise<PackScan> {
  const fh = await open(path, 'r')
  try {
    const size = (await fh.stat()).size
    const hdr = Buffer.alloc(REC_HDR)
    const records: PackRecord[] = []
    let pos = 0
    let tornHex: string | undefined
    while (pos < size) {
      const { bytesRead } = await fh.read(hdr, 0, REC_HDR, pos)
      if (bytesRead < REC_HDR || hdr.readUInt32BE(0) !== MAGIC) break
      const length = hdr.readUInt32BE(4)
      const hex = hdr.toString('hex', 8, 8 + HASH_SIZE)
      if (length > MAX_STORED_CHUNK || pos + REC_HDR + length > size) {
        tornHex = hex
        break
      }
      records.push({ hex, offset: pos + REC_HDR, length })
      pos += REC_HDR + length
    }
    return { records, validEnd: pos, size, ...(tornHex === undefined ? {} : { tornHex }) }
  } finally {
    await fh.close()
  }
}
