import type { SignedRecord } from '../membership/interfaces.ts'
import { MAX_INVITE_LENGTH } from '../membership/invite.ts'
import { MAX_RECORDS } from '../membership/member-set.ts'
import { isValidName } from '../membership/network.ts'
import { ProtocolMessageError } from './errors.ts'
import { decodeJsonObject } from './framing.ts'

/** The only protocol a non-member may open: present an invite, get the member set back. */
export const ADMIT_PROTOCOL = '/mesh/admit/1'
/** Member-set push-pull between members: whole sets (kept for members of an older version). */
export const MEMBERS_PROTOCOL = '/mesh/members/1'
/**
 * Member-set reconciliation (version 2), at most four frames on one stream:
 *   1. initiator → responder  {records: what changed here (may be empty), digest: of the initiator's set,
 *                              addrs: hints of the initiator and of the members in `records`}
 *   2. responder → initiator  {digest} when its set (after merging 1) has that digest: done; else
 *                             {digest, ids: every record id it holds, addrs: all its hints}
 *   3. initiator → responder  {records: the ones missing from `ids`, wantIds: ids it lacks}
 *   4. responder → initiator  {records: those asked for}
 * A change costs a message of its own size per neighbour, an idle check two digests; whole sets never
 * travel, only the difference (and, on a mismatch, the id list: 35 B a record).
 */
export const MEMBERS_PROTOCOL_V2 = '/mesh/members/2'

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

/** One frame of /mesh/members/2 (see MEMBERS_PROTOCOL_V2). */
export interface MembersSyncMessage {
  readonly records: readonly unknown[]
  /** A 32-hex-digit MemberSet.digest(). */
  readonly digest?: string
  readonly ids?: readonly string[]
  readonly wantIds?: readonly string[]
  readonly addrs: Readonly<Record<string, readonly string[]>>
}

const RECORD_ID_RE = /^[0-9a-f]{32}$/

function decodeIds(v: unknown, what: string): string[] | undefined {
  if (v === undefined) return undefined
  if (
    !Array.isArray(v) ||
    v.length > MAX_RECORDS ||
    !v.every((x) => typeof x === 'string' && RECORD_ID_RE.test(x))
  )
    throw new ProtocolMessageError(`bad ${what}`)
  return v as string[]
}

export function decodeMembersSync(frame: Uint8Array): MembersSyncMessage {
  const o = decodeJsonObject(frame)
  if (!Array.isArray(o.records) || o.records.length > MAX_RECORDS)
    throw new ProtocolMessageError('bad records')
  if (o.digest !== undefined && (typeof o.digest !== 'string' || !RECORD_ID_RE.test(o.digest)))
    throw new ProtocolMessageError('bad digest')
  const ids = decodeIds(o.ids, 'ids')
  const wantIds = decodeIds(o.wantIds, 'wantIds')
  return {
    records: o.records,
    ...(o.digest === undefined ? {} : { digest: o.digest as string }),
    ...(ids === undefined ? {} : { ids }),
    ...(wantIds === undefined ? {} : { wantIds }),
    addrs: decodeAddrs(o.addrs),
  }
}

export function decodeMembersMessage(frame: Uint8Array): MembersMessage {
  const o = decodeJsonObject(frame)
  if (o.want !== 'all' && o.want !== 'self' && o.want !== 'none') throw new ProtocolMessageError('bad want')
  if (!Array.isArray(o.records) || o.records.length > MAX_RECORDS)
    throw new ProtocolMessageError('bad records')
  return { want: o.want, records: o.records as SignedRecord[], addrs: decodeAddrs(o.addrs) }
}

function decodeAddrs(v: unknown): Record<string, string[]> {
  const o = { addrs: v }
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
  return addrs
}
