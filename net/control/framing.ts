import { Uint8ArrayList } from 'uint8arraylist'
import { FrameTooLargeError, ProtocolMessageError } from './errors.ts'

/** Frames are a 4-byte big-endian length followed by that many bytes. */
export const HEADER_BYTES = 4

export function encodeFrame(payload: Uint8Array, max: number): Uint8Array {
  if (payload.byteLength > max) throw new FrameTooLargeError(payload.byteLength, max)
  const out = new Uint8Array(HEADER_BYTES + payload.byteLength)
  new DataView(out.buffer).setUint32(0, payload.byteLength)
  out.set(payload, HEADER_BYTES)
  return out
}

/**
 * Incremental decoder. The length is checked as soon as the header is in, before buffering the body,
 * so a hostile peer cannot make us hold more than `max` bytes per stream. Throws FrameTooLargeError only;
 * after a throw the decoder is poisoned (the stream must be reset: framing is lost).
 */
export class FrameDecoder {
  private readonly buf = new Uint8ArrayList()
  private failed: FrameTooLargeError | undefined

  constructor(readonly max: number) {}

  get buffered(): number {
    return this.buf.byteLength
  }

  push(chunk: Uint8Array | Uint8ArrayList): Uint8Array[] {
    if (this.failed !== undefined) throw this.failed
    this.buf.append(chunk)
    const out: Uint8Array[] = []
    while (this.buf.byteLength >= HEADER_BYTES) {
      const len = this.buf.getUint32(0)
      if (len > this.max) {
        this.failed = new FrameTooLargeError(len, this.max)
        throw this.failed
      }
      if (this.buf.byteLength < HEADER_BYTES + len) break
      out.push(this.buf.subarray(HEADER_BYTES, HEADER_BYTES + len))
      this.buf.consume(HEADER_BYTES + len)
    }
    return out
  }
}

const dec = new TextDecoder('utf-8', { fatal: true })
const enc = new TextEncoder()

export function encodeJson(value: unknown, max: number): Uint8Array {
  return encodeFrame(enc.encode(JSON.stringify(value)), max)
}

/** Parses a JSON object frame; throws ProtocolMessageError only. */
export function decodeJsonObject(frame: Uint8Array): Record<string, unknown> {
  let v: unknown
  try {
    v = JSON.parse(dec.decode(frame))
  } catch (err) {
    throw new ProtocolMessageError('not UTF-8 JSON', { cause: err })
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v))
    throw new ProtocolMessageError('not a JSON object')
  return v as Record<string, unknown>
}
