/**
 * Link heartbeat, version 1: the messages of the private `heartbeat` data channel (SCTP stream 100,
 * ordered, reliable) that every WebRTC link end sends, whatever its engine.
 *
 * Wire form (5 bytes): u8 kind · u32 big-endian sequence number.
 *   ping (1): "are you there"; the peer answers with a pong carrying the same sequence number.
 *   pong (2): the answer; its round trip is the link's RTT.
 *   bye  (3): "I am closing this link on purpose" (sequence 0); the peer closes at once instead of
 *            waiting for its dead timer.
 * Any message received on any channel counts as a sign of life, a heartbeat that does not decode too;
 * decoding is strict otherwise (exact length, known kind) and throws HeartbeatDecodeError, which the
 * link ignores. A later version adds kinds (an old end ignores them) or a longer form (MAX bounds it).
 */
import { LinkError } from '../../link/errors.ts'

/** The SCTP stream id of the heartbeat channel (well above the CHANNELS ids). */
export const HEARTBEAT_CHANNEL_ID = 100
export const HEARTBEAT_BYTES = 5
/** Longest message a decoder looks at before refusing it. */
export const MAX_HEARTBEAT_BYTES = 64

export const HEARTBEAT_KINDS = { ping: 1, pong: 2, bye: 3 } as const
export type HeartbeatKind = keyof typeof HEARTBEAT_KINDS

export interface Heartbeat {
  readonly kind: HeartbeatKind
  /** uint32; 0 for bye. */
  readonly seq: number
}

export class HeartbeatDecodeError extends LinkError {
  constructor(message: string) {
    super(`bad heartbeat: ${message}`, { code: 'E_HEARTBEAT_DECODE' })
  }
}

const KIND_BY_CODE = new Map<number, HeartbeatKind>(
  Object.entries(HEARTBEAT_KINDS).map(([k, v]) => [v, k as HeartbeatKind]),
)

export function encodeHeartbeat(hb: Heartbeat): Uint8Array {
  if (!Number.isInteger(hb.seq) || hb.seq < 0 || hb.seq > 0xffffffff)
    throw new HeartbeatDecodeError(`sequence ${hb.seq} is not a uint32`)
  if (!Object.hasOwn(HEARTBEAT_KINDS, hb.kind))
    throw new HeartbeatDecodeError(`unknown kind '${String(hb.kind)}'`)
  const out = new Uint8Array(HEARTBEAT_BYTES)
  out[0] = HEARTBEAT_KINDS[hb.kind]
  new DataView(out.buffer).setUint32(1, hb.seq)
  return out
}

export function decodeHeartbeat(bytes: Uint8Array): Heartbeat {
  if (bytes.byteLength > MAX_HEARTBEAT_BYTES)
    throw new HeartbeatDecodeError(`${bytes.byteLength} bytes, over ${MAX_HEARTBEAT_BYTES}`)
  if (bytes.byteLength !== HEARTBEAT_BYTES)
    throw new HeartbeatDecodeError(`${bytes.byteLength} bytes, want ${HEARTBEAT_BYTES}`)
  const kind = KIND_BY_CODE.get(bytes[0]!)
  if (kind === undefined) throw new HeartbeatDecodeError(`unknown kind ${bytes[0]}`)
  const seq = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(1)
  return { kind, seq }
}
