import { peerIdFromString } from '@libp2p/peer-id'
import {
  InviteBoundError,
  InviteExpiredError,
  InviteForgedError,
  InviteMalformedError,
  InviteWrongNetworkError,
} from './errors.ts'
import type { Invite, InviteBody, NetworkInfo } from './interfaces.ts'
import {
  b64u,
  fromB64u,
  isValidName,
  type NetworkKey,
  networkIdOf,
  networkInfoFromPublic,
  randomNonce,
  verifyWithNetworkKey,
} from './network.ts'

export const INVITE_PREFIX = 'mesh1:'
/** Longest invite string accepted: bounds parsing work on attacker-supplied input. */
export const MAX_INVITE_LENGTH = 4096
const MAX_BOOTSTRAP = 16
const MAX_ADDR_LENGTH = 256

export interface CreateInviteOptions {
  bootstrap: readonly string[]
  /** Validity in ms from `now`. */
  ttlMs: number
  boundPeer?: string
  now?: number
}

export async function createInvite(key: NetworkKey, options: CreateInviteOptions): Promise<Invite> {
  const now = options.now ?? Date.now()
  if (!(options.ttlMs > 0)) throw new InviteMalformedError('ttl must be positive')
  if (options.boundPeer !== undefined) assertPeerId(options.boundPeer)
  const body: InviteBody = {
    v: 1,
    networkId: key.info.id,
    networkName: key.info.name,
    networkPublicKey: b64u(key.info.publicKey),
    bootstrap: [...options.bootstrap],
    expiresAt: now + options.ttlMs,
    nonce: randomNonce(),
    ...(options.boundPeer === undefined ? {} : { boundPeer: options.boundPeer }),
  }
  checkBody(body)
  const bytes = new TextEncoder().encode(JSON.stringify(body))
  const sig = await key.privateKey.sign(bytes)
  const encoded = `${INVITE_PREFIX}${b64u(bytes)}.${b64u(sig)}`
  if (encoded.length > MAX_INVITE_LENGTH)
    throw new InviteMalformedError('too many or too long bootstrap addresses')
  return { body, encoded }
}

/** Parses without checking the signature. Throws only InviteMalformedError. */
export function decodeInvite(encoded: string): { body: InviteBody; bytes: Uint8Array; sig: Uint8Array } {
  if (typeof encoded !== 'string') throw new InviteMalformedError('not a string')
  const text = encoded.trim()
  if (text.length > MAX_INVITE_LENGTH)
    throw new InviteMalformedError(`longer than ${MAX_INVITE_LENGTH} characters`)
  if (!text.startsWith(INVITE_PREFIX)) throw new InviteMalformedError(`must start with '${INVITE_PREFIX}'`)
  const parts = text.slice(INVITE_PREFIX.length).split('.')
  if (parts.length !== 2 || !/^[A-Za-z0-9_-]+$/.test(parts[0]!) || !/^[A-Za-z0-9_-]+$/.test(parts[1]!))
    throw new InviteMalformedError('expected two base64url parts')
  const bytes = fromB64u(parts[0]!)
  const sig = fromB64u(parts[1]!)
  if (sig.byteLength !== 64) throw new InviteMalformedError('signature must be 64 bytes')
  let parsed: unknown
  try {
    parsed = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes))
  } catch (err) {
    throw new InviteMalformedError('body is not JSON', { cause: err })
  }
  const body = checkBody(parsed)
  return { body, bytes, sig }
}

function checkBody(parsed: unknown): InviteBody {
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed))
    throw new InviteMalformedError('body is not an object')
  const o = parsed as Record<string, unknown>
  if (o.v !== 1) throw new InviteMalformedError('unsupported version')
  if (typeof o.networkId !== 'string' || !/^[0-9a-f]{32}$/.test(o.networkId))
    throw new InviteMalformedError('bad networkId')
  if (typeof o.networkName !== 'string' || !isValidName(o.networkName))
    throw new InviteMalformedError('bad networkName')
  if (typeof o.networkPublicKey !== 'string' || !/^[A-Za-z0-9_-]{43}$/.test(o.networkPublicKey))
    throw new InviteMalformedError('bad networkPublicKey')
  if (
    !Array.isArray(o.bootstrap) ||
    o.bootstrap.length > MAX_BOOTSTRAP ||
    !o.bootstrap.every((a) => typeof a === 'string' && a.length > 0 && a.length <= MAX_ADDR_LENGTH)
  )
    throw new InviteMalformedError('bad bootstrap list')
  if (typeof o.expiresAt !== 'number' || !Number.isSafeInteger(o.expiresAt))
    throw new InviteMalformedError('bad expiresAt')
  if (typeof o.nonce !== 'string' || !/^[A-Za-z0-9_-]{22}$/.test(o.nonce))
    throw new InviteMalformedError('bad nonce')
  if (o.boundPeer !== undefined) {
    if (typeof o.boundPeer !== 'string') throw new InviteMalformedError('bad boundPeer')
    assertPeerId(o.boundPeer)
  }
  const known = new Set([
    'v',
    'networkId',
    'networkName',
    'networkPublicKey',
    'bootstrap',
    'expiresAt',
    'nonce',
    'boundPeer',
  ])
  for (const k of Object.keys(o)) if (!known.has(k)) throw new InviteMalformedError(`unknown field '${k}'`)
  return o as unknown as InviteBody
}

function assertPeerId(text: string): void {
  try {
    if (text.length > 128) throw new Error('too long')
    const id = peerIdFromString(text)
    if (id.type !== 'Ed25519') throw new Error('not an Ed25519 PeerId')
  } catch (err) {
    throw new InviteMalformedError(`bad PeerId '${text.slice(0, 64)}'`, { cause: err })
  }
}

export interface VerifyInviteOptions {
  /** The verifier's own network (members). Omit on the joining side: then the invite's embedded key is
   *  checked for consistency with its network id, which proves nothing about who made it, only that it is
   *  intact — the real check happens at the member. */
  network?: NetworkInfo
  /** The noise-authenticated PeerId presenting the invite (checked against a binding). */
  presenter?: string
  now?: number
  /** Skip the expiry check (re-verifying a replicated entry whose admission time was already checked). */
  ignoreExpiry?: boolean
}

/**
 * Verifies an invite. Throws InviteMalformedError, InviteWrongNetworkError, InviteForgedError,
 * InviteExpiredError or InviteBoundError; nothing else.
 */
export async function verifyInvite(encoded: string, options: VerifyInviteOptions = {}): Promise<Invite> {
  const { body, bytes, sig } = decodeInvite(encoded)
  let embedded: NetworkInfo
  try {
    embedded = networkInfoFromPublic(body.networkName, body.networkPublicKey)
  } catch (err) {
    throw new InviteMalformedError('bad network public key', { cause: err })
  }
  if (embedded.id !== body.networkId) throw new InviteForgedError('invite network id does not match its key')
  const network = options.network ?? embedded
  if (network.id !== body.networkId || networkIdOf(network.publicKey, network.name) !== body.networkId)
    throw new InviteWrongNetworkError(`invite is for network ${body.networkId}, this is ${network.id}`)
  if (!(await verifyWithNetworkKey(network, bytes, sig))) throw new InviteForgedError()
  if (options.ignoreExpiry !== true && (options.now ?? Date.now()) >= body.expiresAt)
    throw new InviteExpiredError(body.expiresAt)
  if (body.boundPeer !== undefined && options.presenter !== undefined && body.boundPeer !== options.presenter)
    throw new InviteBoundError(body.boundPeer, options.presenter)
  return { body, encoded: encoded.trim() }
}
