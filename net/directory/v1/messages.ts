import { MeshError } from '../../../src/base/errors.ts'

/**
 * VM directory, version 1: "which VMs run on you?" between members, on each link's 'control' channel
 * (shared with net/diag, told apart by the first byte). Binary header, JSON body:
 *   [tag 0x44 'D'][version 1][type][u32 BE id][JSON, at most MAX_BODY bytes]
 * query body: {"vm"?: NAME}   reply body: {"vms": [VmEntry, ...] (at most MAX_ENTRIES), "now"?: ms}
 * (`now`, the answerer's clock, lets the asker estimate the clock skew between them: `mesh doctor`).
 * Links exist only between members, so whoever asks is a member; answers carry no secrets.
 */
export const DIRECTORY_TAG = 0x44
export const DIRECTORY_VERSION = 1
export const HEADER = 7
export const MAX_BODY = 64 * 1024
export const MAX_ENTRIES = 512

export class DirectoryDecodeError extends MeshError {
  constructor(message: string) {
    super(message, { code: 'E_DIRECTORY_DECODE' })
  }
}

export enum DirectoryType {
  Query = 1,
  Reply = 2,
}

/** One VM as its host describes it. */
export interface VmEntry {
  name: string
  status: string
  /** Guest IPv4 (possibly with /prefix) when its spec names one. */
  ip?: string
  mac?: string
  memoryMiB?: number
  vcpus?: number
}

export type DirectoryMessage =
  | { type: DirectoryType.Query; id: number; vm?: string }
  | {
      type: DirectoryType.Reply
      id: number
      vms: VmEntry[] /** Sender's clock (ms since the epoch). */
      now?: number
    }

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/

export function encodeDirectory(msg: DirectoryMessage): Uint8Array {
  const body =
    msg.type === DirectoryType.Query
      ? JSON.stringify(msg.vm === undefined ? {} : { vm: msg.vm })
      : JSON.stringify({
          vms: msg.vms.slice(0, MAX_ENTRIES),
          ...(msg.now === undefined ? {} : { now: msg.now }),
        })
  const json = new TextEncoder().encode(body)
  if (json.byteLength > MAX_BODY) throw new DirectoryDecodeError('directory message too large')
  const out = new Uint8Array(HEADER + json.byteLength)
  out[0] = DIRECTORY_TAG
  out[1] = DIRECTORY_VERSION
  out[2] = msg.type
  new DataView(out.buffer).setUint32(3, msg.id >>> 0)
  out.set(json, HEADER)
  return out
}

function entry(v: unknown): VmEntry {
  if (typeof v !== 'object' || v === null) throw new DirectoryDecodeError('VM entry is not an object')
  const o = v as Record<string, unknown>
  if (typeof o.name !== 'string' || !NAME_RE.test(o.name)) throw new DirectoryDecodeError('bad VM name')
  if (typeof o.status !== 'string' || o.status.length > 32) throw new DirectoryDecodeError('bad VM status')
  const e: VmEntry = { name: o.name, status: o.status }
  if (o.ip !== undefined) {
    if (typeof o.ip !== 'string' || !/^\d{1,3}(\.\d{1,3}){3}(\/\d{1,2})?$/.test(o.ip))
      throw new DirectoryDecodeError('bad VM ip')
    e.ip = o.ip
  }
  if (o.mac !== undefined) {
    if (typeof o.mac !== 'string' || !/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i.test(o.mac))
      throw new DirectoryDecodeError('bad VM mac')
    e.mac = o.mac
  }
  for (const k of ['memoryMiB', 'vcpus'] as const) {
    const n = o[k]
    if (n === undefined) continue
    if (typeof n !== 'number' || !Number.isInteger(n) || n < 0 || n > 2 ** 32)
      throw new DirectoryDecodeError(`bad VM ${k}`)
    e[k] = n
  }
  return e
}

export function decodeDirectory(bytes: Uint8Array): DirectoryMessage {
  if (bytes.byteLength < HEADER) throw new DirectoryDecodeError('directory message too short')
  if (bytes[0] !== DIRECTORY_TAG) throw new DirectoryDecodeError('not a directory message')
  if (bytes[1] !== DIRECTORY_VERSION)
    throw new DirectoryDecodeError(`unsupported directory version ${bytes[1]}`)
  if (bytes.byteLength - HEADER > MAX_BODY) throw new DirectoryDecodeError('directory message too large')
  const type = bytes[2]
  const id = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(3)
  let body: unknown
  try {
    body = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(HEADER)))
  } catch {
    throw new DirectoryDecodeError('directory body is not JSON')
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body))
    throw new DirectoryDecodeError('directory body is not an object')
  const o = body as Record<string, unknown>
  if (type === DirectoryType.Query) {
    if (o.vm === undefined) return { type, id }
    if (typeof o.vm !== 'string' || !NAME_RE.test(o.vm)) throw new DirectoryDecodeError('bad VM name')
    return { type, id, vm: o.vm }
  }
  if (type === DirectoryType.Reply) {
    if (!Array.isArray(o.vms) || o.vms.length > MAX_ENTRIES) throw new DirectoryDecodeError('bad VM list')
    if (o.now !== undefined && (typeof o.now !== 'number' || !Number.isFinite(o.now) || o.now < 0))
      throw new DirectoryDecodeError('bad clock')
    return { type, id, vms: o.vms.map(entry), ...(o.now === undefined ? {} : { now: o.now }) }
  }
  throw new DirectoryDecodeError(`unknown directory message type ${type}`)
}
