/**
 * Tunnel channel messages, version 1. Every message on a link's `'tunnel'` channel is one of:
 *
 *   byte 0   version (1)
 *   byte 1   type
 *   FRAME      (1): bytes 2.. one Ethernet frame (dst, src, ethertype, payload; no FCS)
 *   FORWARDED  (2): as FRAME, but relayed once by a switch the destination MAC moved away from; a
 *                   forwarded frame is only ever delivered to a local port, never relayed again,
 *                   so no frame can loop between switches
 *   ANNOUNCE   (3): bytes 2..7 MAC, bytes 8..15 epoch (unsigned 64-bit big-endian, at most 2^53-1):
 *                   "this MAC is attached to the sender now"; a higher epoch wins
 *   BATCH      (4): bytes 2.. two or more entries, each a 16-bit big-endian length L (≥ 14) and L
 *                   bytes of one Ethernet frame, each handled exactly as a FRAME. Senders pack small
 *                   frames (TCP ACKs, ARP) that leave a switch together into one message; a batch is
 *                   never bigger than one SCTP chunk (TUNNEL_MESSAGE_BUDGET), so a loss loses little.
 *                   Every entry must be well-formed or the whole message is rejected.
 *
 * Decoding never throws: anything malformed yields `{ ok: false, reason }` so the switch counts it
 * and carries on (a member running a newer version, or garbage, must not disturb the others).
 */
import { ETHERNET_HEADER_BYTES, TUNNEL_HEADER_BYTES } from '../interfaces.ts'

export const TUNNEL_VERSION = 1

export const MessageType = {
  frame: 1,
  forwarded: 2,
  announce: 3,
  batch: 4,
} as const

/** Per-entry overhead of a BATCH: the 16-bit length. */
export const BATCH_ENTRY_HEADER_BYTES = 2

/** Hard upper bound on what the decoder accepts (an Ethernet frame cannot be longer than 64 KiB). */
export const MAX_DECODE_FRAME = 65_535
export const ANNOUNCE_BYTES = TUNNEL_HEADER_BYTES + 6 + 8

export type TunnelMessage =
  | { type: 'frame'; frame: Uint8Array }
  | { type: 'forwarded'; frame: Uint8Array }
  | { type: 'announce'; mac: string; epoch: number }
  | { type: 'batch'; frames: Uint8Array[] }

export type DecodeFailure = { ok: false; reason: 'short' | 'version' | 'type' | 'length' | 'epoch' }
export type DecodeResult = ({ ok: true } & TunnelMessage) | DecodeFailure

/** `52:54:00:12:34:56` → 6 bytes; throws TypeError on anything else. */
export function parseMac(mac: string): Uint8Array {
  const m = /^([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2})$/i.exec(mac)
  if (m === null) throw new TypeError(`not a MAC address: '${mac}'`)
  return Uint8Array.from(m.slice(1).map((h) => Number.parseInt(h, 16)))
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'))

/** 6 bytes at `offset` → lower-case `aa:bb:cc:dd:ee:ff`. */
export function formatMac(bytes: Uint8Array, offset = 0): string {
  return `${HEX[bytes[offset]!]}:${HEX[bytes[offset + 1]!]}:${HEX[bytes[offset + 2]!]}:${HEX[bytes[offset + 3]!]}:${HEX[bytes[offset + 4]!]}:${HEX[bytes[offset + 5]!]}`
}

/** Canonical (lower-case) form of a MAC string; throws TypeError when it is not one. */
export function normalizeMac(mac: string): string {
  return formatMac(parseMac(mac))
}

/** Group bit: broadcast and multicast destinations are flooded. */
export function isGroupMac(frame: Uint8Array, offset = 0): boolean {
  return (frame[offset]! & 1) === 1
}

function encodeFrameAs(type: number, frame: Uint8Array): Uint8Array {
  if (frame.byteLength < ETHERNET_HEADER_BYTES || frame.byteLength > MAX_DECODE_FRAME)
    throw new RangeError(`Ethernet frame of ${frame.byteLength} bytes cannot be encoded`)
  const out = new Uint8Array(TUNNEL_HEADER_BYTES + frame.byteLength)
  out[0] = TUNNEL_VERSION
  out[1] = type
  out.set(frame, TUNNEL_HEADER_BYTES)
  return out
}

export function encodeFrame(frame: Uint8Array): Uint8Array {
  return encodeFrameAs(MessageType.frame, frame)
}

export function encodeForwarded(frame: Uint8Array): Uint8Array {
  return encodeFrameAs(MessageType.forwarded, frame)
}

export function encodeAnnounce(mac: string, epoch: number): Uint8Array {
  if (!Number.isSafeInteger(epoch) || epoch < 0) throw new RangeError(`bad announce epoch ${epoch}`)
  const out = new Uint8Array(ANNOUNCE_BYTES)
  out[0] = TUNNEL_VERSION
  out[1] = MessageType.announce
  out.set(parseMac(mac), 2)
  new DataView(out.buffer).setBigUint64(8, BigInt(epoch))
  return out
}

/** Bytes a BATCH of frames with these sizes takes on the wire. */
export function batchBytes(frameBytes: number, frames: number): number {
  return TUNNEL_HEADER_BYTES + frames * BATCH_ENTRY_HEADER_BYTES + frameBytes
}

/** Packs frames (each 14..65535 bytes, at least two) into one BATCH message. */
export function encodeBatch(frames: readonly Uint8Array[]): Uint8Array {
  if (frames.length < 2) throw new RangeError('a batch carries at least two frames')
  let size = TUNNEL_HEADER_BYTES
  for (const f of frames) {
    if (f.byteLength < ETHERNET_HEADER_BYTES || f.byteLength > MAX_DECODE_FRAME)
      throw new RangeError(`Ethernet frame of ${f.byteLength} bytes cannot be encoded`)
    size += BATCH_ENTRY_HEADER_BYTES + f.byteLength
  }
  const out = new Uint8Array(size)
  out[0] = TUNNEL_VERSION
  out[1] = MessageType.batch
  let off = TUNNEL_HEADER_BYTES
  for (const f of frames) {
    out[off] = f.byteLength >>> 8
    out[off + 1] = f.byteLength & 0xff
    out.set(f, off + BATCH_ENTRY_HEADER_BYTES)
    off += BATCH_ENTRY_HEADER_BYTES + f.byteLength
  }
  return out
}

/**
 * Packs frames into one message of at most `budget` bytes, reusing one buffer: add() until it returns
 * false (no room: take() and start again), then take() the message to send. A single frame comes out
 * as a plain FRAME (what any v1 decoder reads), two or more as a BATCH. take()'s result is a view into
 * the builder's buffer, valid until the next add().
 */
export class BatchBuilder {
  private readonly buf: Uint8Array
  private off = TUNNEL_HEADER_BYTES
  count = 0
  /** Frame bytes held (without headers). */
  frameBytes = 0

  constructor(readonly budget: number) {
    this.buf = new Uint8Array(budget)
  }

  /** Appends a copy of `frame`; false (and nothing added) when it does not fit in the budget. */
  add(frame: Uint8Array): boolean {
    const len = frame.byteLength
    if (len < ETHERNET_HEADER_BYTES || this.off + BATCH_ENTRY_HEADER_BYTES + len > this.budget) return false
    this.buf[this.off] = len >>> 8
    this.buf[this.off + 1] = len & 0xff
    this.buf.set(frame, this.off + BATCH_ENTRY_HEADER_BYTES)
    this.off += BATCH_ENTRY_HEADER_BYTES + len
    this.count++
    this.frameBytes += len
    return true
  }

  /** The message for what was added (undefined when empty), and resets the builder. */
  take(): Uint8Array | undefined {
    const n = this.count
    const end = this.off
    this.count = 0
    this.frameBytes = 0
    this.off = TUNNEL_HEADER_BYTES
    if (n === 0) return undefined
    const b = this.buf
    if (n === 1) {
      // FRAME: header right before the frame, over its (now unneeded) length field.
      const at = BATCH_ENTRY_HEADER_BYTES // the frame starts at TUNNEL_HEADER_BYTES + this
      b[at] = TUNNEL_VERSION
      b[at + 1] = MessageType.frame
      return b.subarray(at, end)
    }
    b[0] = TUNNEL_VERSION
    b[1] = MessageType.batch
    return b.subarray(0, end)
  }
}

function decodeBatch(buf: Uint8Array): DecodeResult {
  const frames: Uint8Array[] = []
  let off = TUNNEL_HEADER_BYTES
  while (off < buf.byteLength) {
    if (off + BATCH_ENTRY_HEADER_BYTES > buf.byteLength) return { ok: false, reason: 'length' }
    const len = (buf[off]! << 8) | buf[off + 1]!
    off += BATCH_ENTRY_HEADER_BYTES
    if (len < ETHERNET_HEADER_BYTES || off + len > buf.byteLength) return { ok: false, reason: 'length' }
    frames.push(buf.subarray(off, off + len))
    off += len
  }
  if (frames.length < 2) return { ok: false, reason: 'length' }
  return { ok: true, type: 'batch', frames }
}

export function encodeMessage(msg: TunnelMessage): Uint8Array {
  switch (msg.type) {
    case 'frame':
      return encodeFrame(msg.frame)
    case 'forwarded':
      return encodeForwarded(msg.frame)
    case 'announce':
      return encodeAnnounce(msg.mac, msg.epoch)
    case 'batch':
      return encodeBatch(msg.frames)
  }
}

/** Decodes one tunnel message. Frame payloads (also a batch's) are views into `buf` (no copy). */
export function decodeMessage(buf: Uint8Array): DecodeResult {
  if (buf.byteLength < TUNNEL_HEADER_BYTES) return { ok: false, reason: 'short' }
  if (buf[0] !== TUNNEL_VERSION) return { ok: false, reason: 'version' }
  const type = buf[1]
  if (type === MessageType.frame || type === MessageType.forwarded) {
    const len = buf.byteLength - TUNNEL_HEADER_BYTES
    if (len < ETHERNET_HEADER_BYTES || len > MAX_DECODE_FRAME) return { ok: false, reason: 'length' }
    const frame = buf.subarray(TUNNEL_HEADER_BYTES)
    return { ok: true, type: type === MessageType.frame ? 'frame' : 'forwarded', frame }
  }
  if (type === MessageType.announce) {
    // Exact length: a later version that needs more fields will bump the version byte.
    if (buf.byteLength !== ANNOUNCE_BYTES) return { ok: false, reason: 'length' }
    const epoch = new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getBigUint64(8)
    if (epoch > BigInt(Number.MAX_SAFE_INTEGER)) return { ok: false, reason: 'epoch' }
    return { ok: true, type: 'announce', mac: formatMac(buf, 2), epoch: Number(epoch) }
  }
  if (type === MessageType.batch) return decodeBatch(buf)
  return { ok: false, reason: 'type' }
}
