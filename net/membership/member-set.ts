import { createHash } from 'node:crypto'
import type { PrivateKey } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { MembershipError, RecordInvalidError } from './errors.ts'
import type {
  InviteBody,
  Member,
  MemberEntryBody,
  NetworkInfo,
  RecordBody,
  RevocationBody,
  SignedRecord,
  VerifiedRecord,
} from './interfaces.ts'
import { verifyInvite } from './invite.ts'
import { b64u, fromB64u, isValidName, type NetworkKey, verifyWithNetworkKey } from './network.ts'

/** Bounds on replicated state, so a member cannot make others parse or keep unbounded data. */
export const MAX_RECORDS = 10_000
export const MAX_RECORD_LENGTH = 8192

const enc = new TextEncoder()

export function recordId(record: SignedRecord): string {
  return createHash('sha256').update(record.body).update('.').update(record.sig).digest('hex').slice(0, 32)
}

/** An admitting member signs the entry with its own identity key. */
export async function signEntry(
  admitter: PrivateKey,
  body: Omit<MemberEntryBody, 'kind'>,
): Promise<SignedRecord> {
  const full: MemberEntryBody = { kind: 'add', ...body }
  const bytes = enc.encode(JSON.stringify(full))
  return { body: b64u(bytes), sig: b64u(await admitter.sign(bytes)) }
}

/** Only the network key can revoke (see interfaces.ts). */
export async function signRevocation(
  key: NetworkKey,
  peerId: string,
  at = Date.now(),
): Promise<SignedRecord> {
  const body: RevocationBody = { kind: 'revoke', networkId: key.info.id, peerId, at }
  const bytes = enc.encode(JSON.stringify(body))
  return { body: b64u(bytes), sig: b64u(await key.privateKey.sign(bytes)) }
}

function parseShape(record: unknown): {
  record: SignedRecord
  bytes: Uint8Array
  sig: Uint8Array
  body: RecordBody
} {
  if (record === null || typeof record !== 'object') throw new RecordInvalidError('not an object')
  const r = record as Record<string, unknown>
  if (typeof r.body !== 'string' || typeof r.sig !== 'string')
    throw new RecordInvalidError('missing body or sig')
  if (
    r.body.length > MAX_RECORD_LENGTH ||
    !/^[A-Za-z0-9_-]*$/.test(r.body) ||
    !/^[A-Za-z0-9_-]{86}$/.test(r.sig)
  )
    throw new RecordInvalidError('bad encoding')
  const bytes = fromB64u(r.body)
  const sig = fromB64u(r.sig)
  // Only the canonical encoding: otherwise one signed record could travel under several ids.
  if (b64u(bytes) !== r.body || b64u(sig) !== r.sig) throw new RecordInvalidError('non-canonical base64url')
  let body: unknown
  try {
    body = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes))
  } catch (err) {
    throw new RecordInvalidError('body is not JSON', { cause: err })
  }
  if (body === null || typeof body !== 'object') throw new RecordInvalidError('body is not an object')
  const b = body as Record<string, unknown>
  const isPeer = (v: unknown): v is string => typeof v === 'string' && v.length > 0 && v.length <= 128
  const isTime = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0
  if (b.kind === 'add') {
    if (
      !isPeer(b.peerId) ||
      !isPeer(b.addedBy) ||
      typeof b.name !== 'string' ||
      !isValidName(b.name) ||
      typeof b.invite !== 'string' ||
      !isTime(b.addedAt) ||
      Object.keys(b).length !== 6
    )
      throw new RecordInvalidError('bad member entry fields')
  } else if (b.kind === 'revoke') {
    if (!isPeer(b.peerId) || typeof b.networkId !== 'string' || !isTime(b.at) || Object.keys(b).length !== 4)
      throw new RecordInvalidError('bad revocation fields')
  } else {
    throw new RecordInvalidError('unknown record kind')
  }
  return { record: { body: r.body, sig: r.sig }, bytes, sig, body: b as unknown as RecordBody }
}

/**
 * Verifies one record on its own (no other state needed: that is what makes merge a plain union).
 * Throws RecordInvalidError only.
 */
export async function verifyRecord(network: NetworkInfo, raw: unknown): Promise<VerifiedRecord> {
  const { record, bytes, sig, body } = parseShape(raw)
  const id = recordId(record)
  if (body.kind === 'revoke') {
    if (body.networkId !== network.id) throw new RecordInvalidError('revocation for another network')
    if (!(await verifyWithNetworkKey(network, bytes, sig)))
      throw new RecordInvalidError('revocation not signed by the network key')
    return { id, record, body }
  }
  let signerOk = false
  try {
    const admitter = peerIdFromString(body.addedBy)
    peerIdFromString(body.peerId)
    signerOk = admitter.publicKey !== undefined && (await admitter.publicKey.verify(bytes, sig))
  } catch (err) {
    throw new RecordInvalidError('bad PeerId in entry', { cause: err })
  }
  if (!signerOk) throw new RecordInvalidError('entry not signed by its admitter')
  let invite: InviteBody
  try {
    invite = (await verifyInvite(body.invite, { network, presenter: body.peerId, ignoreExpiry: true })).body
  } catch (err) {
    throw new RecordInvalidError(`entry's invite: ${(err as Error).message}`, { cause: err })
  }
  if (body.addedAt >= invite.expiresAt) throw new RecordInvalidError('entry added after its invite expired')
  return { id, record, body, invite }
}

/**
 * The replicated member set: a grow-only set of verified records. Members are derived:
 * an entry counts if its peer is not revoked and it holds its invite nonce (smallest PeerId among the
 * entries sharing a nonce). Deterministic in the set, whatever order records arrived in.
 */
export class MemberSet {
  private readonly records = new Map<string, VerifiedRecord>()
  private cache: Map<string, Member> | undefined

  constructor(readonly network: NetworkInfo) {}

  get size(): number {
    return this.records.size
  }

  has(id: string): boolean {
    return this.records.has(id)
  }

  /** Adds one record; true when it was new. Throws RecordInvalidError (bad record) or MembershipError (full). */
  async add(raw: unknown): Promise<boolean> {
    // Known records are skipped before the signature checks: repeated gossip costs a hash, not a verify.
    const r = raw as Partial<SignedRecord> | null
    if (r !== null && typeof r === 'object' && typeof r.body === 'string' && typeof r.sig === 'string') {
      if (this.records.has(recordId({ body: r.body, sig: r.sig }))) return false
    }
    const v = await verifyRecord(this.network, raw)
    return this.insert(v)
  }

  insert(v: VerifiedRecord): boolean {
    if (this.records.has(v.id)) return false
    if (this.records.size >= MAX_RECORDS) throw new MembershipError('member set is full')
    this.records.set(v.id, v)
    this.cache = undefined
    return true
  }

  /** Merges many records; invalid ones are skipped and counted, so one bad record cannot block the rest. */
  async merge(
    raws: readonly unknown[],
  ): Promise<{ added: number; invalid: number; records: SignedRecord[] }> {
    let added = 0
    let invalid = 0
    const records: SignedRecord[] = []
    for (const raw of raws) {
      try {
        if (await this.add(raw)) {
          added++
          const r = raw as SignedRecord
          records.push({ body: r.body, sig: r.sig })
        }
      } catch (err) {
        if (!(err instanceof MembershipError)) throw err
        invalid++
      }
    }
    return { added, invalid, records }
  }

  /** Every record id, sorted. */
  ids(): string[] {
    return [...this.records.keys()].sort()
  }

  /** The records this set holds among `ids` (unknown ids are skipped). */
  byIds(ids: Iterable<string>): SignedRecord[] {
    const out: SignedRecord[] = []
    for (const id of ids) {
      const v = this.records.get(id)
      if (v !== undefined) out.push(v.record)
    }
    return out
  }

  /** All records, sorted by id (a canonical order, so equal sets serialise equally). */
  list(): SignedRecord[] {
    return [...this.records.values()]
      .sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))
      .map((v) => v.record)
  }

  /** Hash of the sorted record ids: equal digests mean equal sets (used to skip needless gossip). */
  digest(): string {
    const h = createHash('sha256')
    for (const id of [...this.records.keys()].sort()) h.update(id)
    return h.digest('hex').slice(0, 32)
  }

  isRevoked(peer: string): boolean {
    for (const v of this.records.values()) if (v.body.kind === 'revoke' && v.body.peerId === peer) return true
    return false
  }

  isMember(peer: string): boolean {
    return this.compute().has(peer)
  }

  member(peer: string): Member | undefined {
    return this.compute().get(peer)
  }

  members(): Member[] {
    return [...this.compute().values()].sort((a, b) => (a.peerId < b.peerId ? -1 : 1))
  }

  /** The peer that holds this invite nonce, if any entry used it (revoked peers keep their nonce). */
  nonceHolder(nonce: string): string | undefined {
    let holder: string | undefined
    for (const v of this.records.values()) {
      if (
        v.body.kind === 'add' &&
        v.invite?.nonce === nonce &&
        (holder === undefined || v.body.peerId < holder)
      )
        holder = v.body.peerId
    }
    return holder
  }

  private compute(): Map<string, Member> {
    if (this.cache !== undefined) return this.cache
    const revoked = new Set<string>()
    const nonceWinner = new Map<string, string>()
    for (const v of this.records.values()) {
      if (v.body.kind === 'revoke') revoked.add(v.body.peerId)
      else if (v.invite !== undefined) {
        const cur = nonceWinner.get(v.invite.nonce)
        if (cur === undefined || v.body.peerId < cur) nonceWinner.set(v.invite.nonce, v.body.peerId)
      }
    }
    const out = new Map<string, Member>()
    const chosen = new Map<string, VerifiedRecord>()
    for (const v of this.records.values()) {
      const b = v.body
      if (b.kind !== 'add' || v.invite === undefined) continue
      if (revoked.has(b.peerId) || nonceWinner.get(v.invite.nonce) !== b.peerId) continue
      // Several valid entries for one peer (it re-joined with a new invite): the latest names it.
      const prev = chosen.get(b.peerId)
      const prevBody = prev?.body as MemberEntryBody | undefined
      if (
        prevBody === undefined ||
        b.addedAt > prevBody.addedAt ||
        (b.addedAt === prevBody.addedAt && v.id > prev!.id)
      )
        chosen.set(b.peerId, v)
    }
    for (const [peer, v] of chosen) {
      const b = v.body as MemberEntryBody
      out.set(peer, {
        peerId: peer,
        name: b.name,
        addedBy: b.addedBy,
        addedAt: b.addedAt,
        inviteNonce: v.invite!.nonce,
      })
    }
    this.cache = out
    return out
  }
}
