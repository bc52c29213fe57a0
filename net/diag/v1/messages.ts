import { MeshError } from '../../../src/base/errors.ts'

/**
 * Link diagnostics, version 1, on each link's 'control' channel: ping/pong for RTT and a bulk
 * transfer for `mesh bench`. Binary: [version=1][type][u32 BE seq][payload].
 */
export const DIAG_VERSION = 1
export const HEADER = 6
/** Bench data messages carry at most this much payload; anything larger is a protocol error. */
export const MAX_DIAG_PAYLOAD = 64 * 1024

export class DiagDecodeError extends MeshError {
  constructor(message: string) {
    super(message, { code: 'E_DIAG_DECODE' })
  }
}

export enum DiagType {
  Ping = 1,
  Pong = 2,
  Data = 3,
  End = 4,
  Done = 5,
}

export interface DiagMessage {
  type: DiagType
  seq: number
  payload: Uint8Array
}

export function encodeDiag(type: DiagType, seq: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(HEADER + payload.byteLength)
  out[0] = DIAG_VERSION
  out[1] = type
  new DataView(out.buffer).setUint32(2, seq >>> 0)
  out.set(payload, HEADER)
  return out
}

export function decodeDiag(bytes: Uint8Array): DiagMessage {
  if (bytes.byteLength < HEADER)
    throw new DiagDecodeError(`diag message too short (${bytes.byteLength} bytes)`)
  if (bytes[0] !== DIAG_VERSION) throw new DiagDecodeError(`unsupported diag version ${bytes[0]}`)
  const type = bytes[1] as number
  if (type < DiagType.Ping || type > DiagType.Done)
    throw new DiagDecodeError(`unknown diag message type ${type}`)
  if (bytes.byteLength - HEADER > MAX_DIAG_PAYLOAD) throw new DiagDecodeError('diag payload too large')
  const seq = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(2)
  return { type, seq, payload: bytes.subarray(HEADER) }
}

/** The Done message's payload: bytes the receiver counted (u64 as two u32 halves; JS-safe). */
export function encodeCount(n: number): Uint8Array {
  const b = new Uint8Array(8)
  const v = new DataView(b.buffer)
  v.setUint32(0, Math.floor(n / 2 ** 32))
  v.setUint32(4, n >>> 0)
  return b
}

export function decodeCount(b: Uint8Array): number {
  if (b.byteLength !== 8) throw new DiagDecodeError('bad count payload')
  const v = new DataView(b.buffer, b.byteOffset, 8)
  return v.getUint32(0) * 2 ** 32 + v.getUint32(4)
}
