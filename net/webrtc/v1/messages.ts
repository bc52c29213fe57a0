/**
 * Signaling messages, version 1: how two link ends exchange SDP and ICE candidates.
 *
 * Wire form: UTF-8 JSON object, at most MAX_SIGNAL_BYTES. Decoding is defensive: every field is
 * type-checked and length-limited, unknown fields are ignored (forward compatible), and anything else
 * throws SignalDecodeError, never a TypeError from deep inside. `session` names one link attempt so
 * that messages of an earlier attempt (late candidates, a stale answer) are ignored by a newer one.
 */
import { SignalDecodeError } from '../errors.ts'

export const SIGNAL_VERSION = 1
export const MAX_SIGNAL_BYTES = 64 * 1024
export const MAX_SDP_LENGTH = 48 * 1024
export const MAX_CANDIDATE_LENGTH = 1024
export const MAX_MID_LENGTH = 64
export const MAX_REASON_LENGTH = 256
const SESSION_RE = /^[A-Za-z0-9_-]{1,64}$/
const TOKEN_RE = /^[A-Za-z0-9_-]{22}$/
const PUNCH_ADDR_RE = /^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}$/

interface Base {
  readonly v: 1
  /** Identifies one link attempt (chosen by the initiator). */
  readonly session: string
}
export interface OfferMessage extends Base {
  readonly type: 'offer'
  readonly sdp: string
}
export interface AnswerMessage extends Base {
  readonly type: 'answer'
  readonly sdp: string
}
export interface CandidateMessage extends Base {
  readonly type: 'candidate'
  readonly candidate: string
  readonly sdpMid?: string
  readonly sdpMLineIndex?: number
}
export interface EndOfCandidatesMessage extends Base {
  readonly type: 'end-of-candidates'
}
export interface ByeMessage extends Base {
  readonly type: 'bye'
  readonly reason?: string
}
/**
 * After the link is up, the two ends agree on a direct libp2p path for the bulk channels
 * (net/link/direct): the side that could dial the other offers the token its streams carry (no token:
 * "I cannot reach you, try me"); the other answers with an ack. Carried here because this stream is the
 * pair's authenticated rendezvous; the link engines ignore these types.
 */
export interface DirectOfferMessage extends Base {
  readonly type: 'direct'
  /** base64url of the 16-byte token the offered streams carry; absent when the sender cannot dial. */
  readonly token?: string
}
export interface DirectAckMessage extends Base {
  readonly type: 'direct-ack'
  readonly ok: boolean
}
/**
 * TCP hole punching for the bulk channels (net/link/direct/punch.ts), when neither end can dial the
 * other: each end's public TCP address as its NAT maps the port it will punch from; absent when it
 * cannot punch (symmetric NAT, no STUN answer, punching off).
 */
export interface DirectPunchMessage extends Base {
  readonly type: 'punch'
  /** "a.b.c.d:port" (IPv4). */
  readonly addr?: string
}
export type SignalMessage =
  | OfferMessage
  | AnswerMessage
  | CandidateMessage
  | EndOfCandidatesMessage
  | ByeMessage
  | DirectOfferMessage
  | DirectAckMessage
  | DirectPunchMessage
export type SignalType = SignalMessage['type']

function str(obj: Record<string, unknown>, key: string, max: number, optional: true): string | undefined
function str(obj: Record<string, unknown>, key: string, max: number, optional?: false): string
function str(obj: Record<string, unknown>, key: string, max: number, optional = false): string | undefined {
  const v = obj[key]
  if (v === undefined && optional) return undefined
  if (typeof v !== 'string') throw new SignalDecodeError(`field '${key}' must be a string`)
  if (v.length > max) throw new SignalDecodeError(`field '${key}' longer than ${max}`)
  return v
}

/** Validates an already-parsed value (e.g. from a transport that carries objects). */
export function validateSignal(value: unknown): SignalMessage {
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new SignalDecodeError('not an object')
  const obj = value as Record<string, unknown>
  if (obj.v !== SIGNAL_VERSION) throw new SignalDecodeError(`unsupported version ${JSON.stringify(obj.v)}`)
  const session = str(obj, 'session', 64)
  if (!SESSION_RE.test(session)) throw new SignalDecodeError('bad session id')
  const type = obj.type
  switch (type) {
    case 'offer':
    case 'answer': {
      const sdp = str(obj, 'sdp', MAX_SDP_LENGTH)
      if (sdp.length === 0) throw new SignalDecodeError('empty sdp')
      return { v: 1, session, type, sdp }
    }
    case 'candidate': {
      const candidate = str(obj, 'candidate', MAX_CANDIDATE_LENGTH)
      const sdpMid = str(obj, 'sdpMid', MAX_MID_LENGTH, true)
      const idx = obj.sdpMLineIndex
      if (idx !== undefined && !(typeof idx === 'number' && Number.isInteger(idx) && idx >= 0 && idx <= 255))
        throw new SignalDecodeError("field 'sdpMLineIndex' must be an integer 0..255")
      const msg: CandidateMessage = { v: 1, session, type, candidate }
      return {
        ...msg,
        ...(sdpMid === undefined ? {} : { sdpMid }),
        ...(idx === undefined ? {} : { sdpMLineIndex: idx }),
      }
    }
    case 'end-of-candidates':
      return { v: 1, session, type }
    case 'bye': {
      const reason = str(obj, 'reason', MAX_REASON_LENGTH, true)
      return reason === undefined ? { v: 1, session, type } : { v: 1, session, type, reason }
    }
    case 'direct': {
      const token = str(obj, 'token', 32, true)
      if (token !== undefined && !TOKEN_RE.test(token)) throw new SignalDecodeError('bad direct token')
      return token === undefined ? { v: 1, session, type } : { v: 1, session, type, token }
    }
    case 'direct-ack': {
      if (typeof obj.ok !== 'boolean') throw new SignalDecodeError("field 'ok' must be a boolean")
      return { v: 1, session, type, ok: obj.ok }
    }
    case 'punch': {
      const addr = str(obj, 'addr', 21, true)
      if (addr !== undefined && !PUNCH_ADDR_RE.test(addr)) throw new SignalDecodeError('bad punch address')
      return addr === undefined ? { v: 1, session, type } : { v: 1, session, type, addr }
    }
    default:
      throw new SignalDecodeError(`unknown type ${JSON.stringify(type)?.slice(0, 40)}`)
  }
}

export function encodeSignal(msg: SignalMessage): Uint8Array {
  // Validate on the way out too: a message we would refuse to decode must not be sent.
  const bytes = new TextEncoder().encode(JSON.stringify(validateSignal(msg)))
  if (bytes.byteLength > MAX_SIGNAL_BYTES)
    throw new SignalDecodeError(`encoded size over ${MAX_SIGNAL_BYTES}`)
  return bytes
}

export function decodeSignal(bytes: Uint8Array): SignalMessage {
  if (bytes.byteLength > MAX_SIGNAL_BYTES) throw new SignalDecodeError(`over ${MAX_SIGNAL_BYTES} bytes`)
  let value: unknown
  try {
    value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes))
  } catch (err) {
    throw new SignalDecodeError('not UTF-8 JSON', { cause: err })
  }
  return validateSignal(value)
}
