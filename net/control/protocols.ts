import type { SignedRecord } from '../membership/interfaces.ts'
import { MAX_INVITE_LENGTH } from '../membership/invite.ts'
import { MAX_RECORDS } from '../membership/member-set.ts'
import { isValidName } from '../membership/network.ts'
import { ProtocolMessageError } from './errors.ts'
import { decodeJsonObject } from './framing.ts'

/** The only protocol a non-member may open: present an invite, get the member set back. */
export const ADMIT_PROTOCOL = '/mesh/admit/1'
/** Member-set push-pull between members. */
export const MEMBERS_PROTOCOL = '/mesh/members/1'

export const MAX_ADMIT_FRAME = 8 * 1024
export const MAX_MEMBERS_FRAME = 16 * 1024 * 1024
const MAX_ADDRS_PER_PEER = 16
const MAX_ADDR_LENGTH = 256

export interface AdmitRequest {
  readonly invite: string
  readonly name: string
}

export type AdmitResponse =
  | { readonly ok: true; readonly records: readonly unknown[] }
  | { readonly ok: false; readonly code: string; readonly reason: string }

/** `want: 'self'` asks only for the records about the responder itself (cheap membership proof). */
export interface MembersMessage {
  readonly want: 'all' | 'self' | 'none'
  readonly records: readonly unknown[]
  /** Address hints: PeerId → multiaddrs. Unsigned: noise proves who answers a dial, so a wrong hint
   *  costs a failed dial, never an impersonation. */
  readonly addrs: Readonly<Record<string, readonly string[]>>
}

export function decodeAdmitRequest(frame: Uint8Array): AdmitRequest {
  const o = decodeJsonObject(frame)
  if (typeof o.invite !== 'string' || o.invite.length > MAX_INVITE_LENGTH)
    throw new ProtocolMessageError('bad invite')
  if (typeof o.name !== 'string' || !isValidName(o.name)) throw new ProtocolMessageError('bad name')
  return { invite: o.invite, name: o.name }
}

export function decodeAdmitResponse(frame: Uint8Array): AdmitResponse {
  const o = decodeJsonObject(frame)
  if (o.ok === true) {
    if (!Array.isArray(o.records) || o.records.length > MAX_RECORDS)
      throw new ProtocolMessageError('bad records')
    return { ok: true, records: o.records }
  }
  if (o.ok === false && typeof o.code === 'string' && typeof o.reason === 'string')
    return { ok: false, code: o.code.slice(0, 64), reason: o.reason.slice(0, 512) }
  throw new ProtocolMessageError('bad admission response')
}

export function decodeMembersMessage(frame: Uint8Array): MembersMessage {
  const o = decodeJsonObject(frame)
  if (o.want !== 'all' && o.want !== 'self' && o.want !== 'none') throw new ProtocolMessageError('bad want')
  if (!Array.isArray(o.records) || o.records.length > MAX_RECORDS)
    throw new ProtocolMessageError('bad records')
  const addrs: Record<string, string[]> = {}
  if (o.addrs !== undefined) {
    if (o.addrs === null || typeof o.addrs !== 'object' || Array.isArray(o.addrs))
      throw new ProtocolMessageError('bad addrs')
    const entries = Object.entries(o.addrs as Record<string, unknown>)
    if (entries.length > MAX_RECORDS) throw new ProtocolMessageError('too many addrs')
    for (const [peer, list] of entries) {
      if (peer.length > 128 || !Array.isArray(list) || list.length > MAX_ADDRS_PER_PEER)
        throw new ProtocolMessageError('bad addrs entry')
      if (!list.every((a) => typeof a === 'string' && a.length <= MAX_ADDR_LENGTH))
        throw new ProtocolMessageError('bad address')
      addrs[peer] = list as string[]
    }
  }
  return { want: o.want, records: o.records as SignedRecord[], addrs }
}
