import { MeshError } from '../../../base/errors.ts'

/**
 * Agent calls between members, version 1: small request/response JSON on each link's 'control' channel
 * (reliable, ordered). The control channel is shared with link diagnostics, so the first byte names the
 * protocol: diag's is its version (1), agent calls' is CALLS_TAG; then the version, then UTF-8 JSON:
 *
 *   [0x10][1]{"t":"req","id":7,"method":"spot.capacity","params":{…}}
 *   [0x10][1]{"t":"res","id":7,"ok":true,"result":…}
 *   [0x10][1]{"t":"res","id":7,"ok":false,"error":{"code":"E_…","message":"…"}}
 *   [0x10][1]{"t":"cancel","id":7}        (the caller gave up: the callee aborts the handler's signal)
 *
 * Ids are per sender; a response carries its request's id. Messages are at most MAX_CALL_BYTES (a call
 * moves capacity figures, reservations and manifest ids, never bulk data: that goes on 'chunks').
 */
export const CALLS_TAG = 0x10
export const CALLS_VERSION = 1
export const MAX_CALL_BYTES = 64 * 1024
const METHOD_RE = /^[a-z][a-z0-9.-]{0,63}$/

export class CallDecodeError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CALL_DECODE' })
  }
}

export interface CallRequest {
  t: 'req'
  id: number
  method: string
  params: unknown
}
export interface CallError {
  code: string
  message: string
}
export type CallResponse =
  | { t: 'res'; id: number; ok: true; result: unknown }
  | { t: 'res'; id: number; ok: false; error: CallError }
export interface CallCancel {
  t: 'cancel'
  id: number
}
export type CallMessage = CallRequest | CallResponse | CallCancel

export function isCallMessage(bytes: Uint8Array): boolean {
  return bytes.byteLength >= 2 && bytes[0] === CALLS_TAG
}

export function encodeCall(m: CallMessage): Uint8Array {
  const body = Buffer.from(JSON.stringify(m), 'utf8')
  if (body.byteLength + 2 > MAX_CALL_BYTES)
    throw new CallDecodeError(`call message of ${body.byteLength} bytes exceeds ${MAX_CALL_BYTES}`)
  const out = new Uint8Array(body.byteLength + 2)
  out[0] = CALLS_TAG
  out[1] = CALLS_VERSION
  out.set(body, 2)
  return out
}

export function decodeCall(bytes: Uint8Array): CallMessage {
  if (bytes.byteLength < 2 || bytes[0] !== CALLS_TAG) throw new CallDecodeError('not an agent call')
  if (bytes[1] !== CALLS_VERSION) throw new CallDecodeError(`unsupported agent call version ${bytes[1]}`)
  if (bytes.byteLength > MAX_CALL_BYTES) throw new CallDecodeError('agent call too large')
  let o: unknown
  try {
    o = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset + 2, bytes.byteLength - 2).toString('utf8'))
  } catch (cause) {
    throw new CallDecodeError('agent call is not JSON', { cause })
  }
  if (typeof o !== 'object' || o === null || Array.isArray(o))
    throw new CallDecodeError('agent call is not an object')
  const m = o as Record<string, unknown>
  if (typeof m.id !== 'number' || !Number.isSafeInteger(m.id) || m.id < 0)
    throw new CallDecodeError('agent call id must be a non-negative integer')
  if (m.t === 'req') {
    if (typeof m.method !== 'string' || !METHOD_RE.test(m.method))
      throw new CallDecodeError('agent call method must be a short lowercase name')
    return { t: 'req', id: m.id, method: m.method, params: m.params ?? {} }
  }
  if (m.t === 'cancel') return { t: 'cancel', id: m.id }
  if (m.t === 'res') {
    if (m.ok === true) return { t: 'res', id: m.id, ok: true, result: m.result ?? null }
    const e = m.error as Record<string, unknown> | null | undefined
    if (m.ok === false && typeof e === 'object' && e !== null)
      return {
        t: 'res',
        id: m.id,
        ok: false,
        error: {
          code: typeof e.code === 'string' ? e.code.slice(0, 64) : 'E_MESH',
          message: typeof e.message === 'string' ? e.message.slice(0, 1024) : 'unknown error',
        },
      }
    throw new CallDecodeError('agent call response has neither ok result nor error')
  }
  throw new CallDecodeError(`unknown agent call message type ${JSON.stringify(m.t)?.slice(0, 16)}`)
}
