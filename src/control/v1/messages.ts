import { MeshError } from '../../base/errors.ts'

/**
 * Local control API, version 1: newline-delimited JSON over a unix socket that only the agent's owner
 * can open. A request may stream events before its single result or error.
 *
 *   → {"v":1,"id":7,"method":"peers","params":{}}
 *   ← {"v":1,"id":7,"event":{...}}        (zero or more)
 *   ← {"v":1,"id":7,"result":...}          or  {"v":1,"id":7,"error":{"code":"E_…","message":"…"}}
 *   → {"v":1,"id":7,"cancel":true}          (aborts the request's AbortSignal)
 */
export const CONTROL_VERSION = 1
/** Longest line either side accepts; larger input is a protocol error, never buffered without end. */
export const MAX_LINE_BYTES = 1024 * 1024

export class ControlProtocolError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CONTROL_PROTOCOL' })
  }
}

export interface RequestMessage {
  v: 1
  id: number
  method: string
  params: unknown
}
export interface CancelMessage {
  v: 1
  id: number
  cancel: true
}
export interface ErrorBody {
  code: string
  message: string
  exitCode?: number
}
export type ResponseMessage =
  | { v: 1; id: number; event: unknown }
  | { v: 1; id: number; result: unknown }
  | { v: 1; id: number; error: ErrorBody }

function parseObject(line: string): Record<string, unknown> {
  if (line.length > MAX_LINE_BYTES)
    throw new ControlProtocolError(`message longer than ${MAX_LINE_BYTES} bytes`)
  let value: unknown
  try {
    value = JSON.parse(line)
  } catch (cause) {
    throw new ControlProtocolError('message is not valid JSON', { cause })
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new ControlProtocolError('message is not a JSON object')
  }
  const obj = value as Record<string, unknown>
  if (obj.v !== CONTROL_VERSION)
    throw new ControlProtocolError(`unsupported control protocol version ${String(obj.v)}`)
  if (typeof obj.id !== 'number' || !Number.isSafeInteger(obj.id) || obj.id < 0) {
    throw new ControlProtocolError('message id must be a non-negative integer')
  }
  return obj
}

const METHOD_RE = /^[a-z][a-z0-9.-]{0,63}$/

export function decodeClientMessage(line: string): RequestMessage | CancelMessage {
  const obj = parseObject(line)
  const id = obj.id as number
  if (obj.cancel === true) return { v: 1, id, cancel: true }
  if (typeof obj.method !== 'string' || !METHOD_RE.test(obj.method)) {
    throw new ControlProtocolError('request method must be a short lowercase name')
  }
  return { v: 1, id, method: obj.method, params: obj.params ?? {} }
}

export function decodeServerMessage(line: string): ResponseMessage {
  const obj = parseObject(line)
  const id = obj.id as number
  if ('event' in obj) return { v: 1, id, event: obj.event }
  if ('result' in obj) return { v: 1, id, result: obj.result }
  const err = obj.error
  if (typeof err === 'object' && err !== null) {
    const e = err as Record<string, unknown>
    return {
      v: 1,
      id,
      error: {
        code: typeof e.code === 'string' ? e.code.slice(0, 64) : 'E_MESH',
        message: typeof e.message === 'string' ? e.message.slice(0, 4096) : 'unknown error',
        ...(typeof e.exitCode === 'number' ? { exitCode: e.exitCode } : {}),
      },
    }
  }
  throw new ControlProtocolError('response has neither event, result nor error')
}

export function encode(msg: RequestMessage | CancelMessage | ResponseMessage): string {
  return `${JSON.stringify(msg)}\n`
}

/**
 * Splits a byte stream into lines, refusing any line longer than MAX_LINE_BYTES so that a peer
 * cannot make us buffer without bound.
 */
export class LineSplitter {
  private buf = ''
  push(chunk: string, onLine: (line: string) => void): void {
    this.buf += chunk
    let nl = this.buf.indexOf('\n')
    while (nl >= 0) {
      const line = this.buf.slice(0, nl)
      this.buf = this.buf.slice(nl + 1)
      if (line.length > 0) onLine(line)
      nl = this.buf.indexOf('\n')
    }
    if (this.buf.length > MAX_LINE_BYTES) {
      this.buf = ''
      throw new ControlProtocolError(`message longer than ${MAX_LINE_BYTES} bytes`)
    }
  }
}
