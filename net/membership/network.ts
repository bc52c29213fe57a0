import { createHash, randomBytes } from 'node:crypto'
import { chmod, readFile, stat } from 'node:fs/promises'
import {
  generateKeyPair,
  privateKeyFromProtobuf,
  privateKeyToProtobuf,
  publicKeyFromRaw,
} from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { writeFileDurable } from '../../src/base/fs.ts'
import { NetworkKeyError } from './errors.ts'
import type { NetworkInfo } from './interfaces.ts'

/** A network's secret key, held by its creator only. */
export interface NetworkKey {
  readonly info: NetworkInfo
  readonly privateKey: PrivateKey
}

export const MAX_NAME_LENGTH = 64
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/

export function isValidName(name: string): boolean {
  return NAME_RE.test(name)
}

/** sha256(public key ‖ name), hex, shortened: binds a name to one key. */
export function networkIdOf(publicKey: Uint8Array, name: string): string {
  return createHash('sha256').update(publicKey).update(Buffer.from(name, 'utf8')).digest('hex').slice(0, 32)
}

export function b64u(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64url')
}

export function fromB64u(text: string): Uint8Array {
  return new Uint8Array(Buffer.from(text, 'base64url'))
}

export async function createNetwork(name: string): Promise<NetworkKey> {
  if (!isValidName(name))
    throw new NetworkKeyError(`invalid network name '${name}' (letters, digits, . _ -; max 64)`)
  const privateKey = await generateKeyPair('Ed25519')
  const publicKey = privateKey.publicKey.raw
  return { privateKey, info: { id: networkIdOf(publicKey, name), name, publicKey } }
}

/** The network's public part, as carried in invites and kept by every member. */
export function networkInfoFromPublic(name: string, publicKeyB64u: string): NetworkInfo {
  const publicKey = fromB64u(publicKeyB64u)
  if (publicKey.byteLength !== 32) throw new NetworkKeyError('network public key must be 32 bytes')
  return { id: networkIdOf(publicKey, name), name, publicKey }
}

export async function verifyWithNetworkKey(
  network: NetworkInfo,
  data: Uint8Array,
  sig: Uint8Array,
): Promise<boolean> {
  try {
    return await publicKeyFromRaw(network.publicKey).verify(data, sig)
  } catch {
    return false
  }
}

export function encodeNetworkKey(key: NetworkKey): string {
  return `${JSON.stringify({
    v: 1,
    kind: 'mesh-network-key',
    name: key.info.name,
    id: key.info.id,
    secretKey: b64u(privateKeyToProtobuf(key.privateKey)),
  })}\n`
}

export function decodeNetworkKey(text: string): NetworkKey {
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (err) {
    throw new NetworkKeyError('network key file is not valid JSON', { cause: err })
  }
  const o = parsed as Record<string, unknown>
  if (o === null || typeof o !== 'object' || o.kind !== 'mesh-network-key' || o.v !== 1)
    throw new NetworkKeyError('not a mesh network key file')
  if (typeof o.name !== 'string' || !isValidName(o.name) || typeof o.secretKey !== 'string')
    throw new NetworkKeyError('network key file lacks name or secretKey')
  let privateKey: PrivateKey
  try {
    privateKey = privateKeyFromProtobuf(fromB64u(o.secretKey))
  } catch (err) {
    throw new NetworkKeyError('network key file holds an unreadable key', { cause: err })
  }
  if (privateKey.type !== 'Ed25519') throw new NetworkKeyError('network key must be Ed25519')
  const publicKey = privateKey.publicKey.raw
  const info = { id: networkIdOf(publicKey, o.name), name: o.name, publicKey }
  if (o.id !== undefined && o.id !== info.id)
    throw new NetworkKeyError('network key file id does not match its key')
  return { privateKey, info }
}

/** Writes the key file exclusively with mode 0600 (refuses to overwrite an existing network key). */
export async function saveNetworkKey(path: string, key: NetworkKey): Promise<void> {
  try {
    await writeFileDurable(path, encodeNetworkKey(key), { exclusive: true, mode: 0o600 })
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST')
      throw new NetworkKeyError(`${path} already exists; refusing to overwrite a network key`, { cause: err })
    throw new NetworkKeyError(`cannot write ${path}: ${(err as Error).message}`, { cause: err })
  }
  await chmod(path, 0o600)
}

/** Reads a key file; refuses one that group or others can read (a leaked key cannot be revoked). */
export async function loadNetworkKey(path: string): Promise<NetworkKey> {
  let text: string
  try {
    const st = await stat(path)
    if ((st.mode & 0o077) !== 0)
      throw new NetworkKeyError(
        `${path} is readable by others (mode ${(st.mode & 0o777).toString(8)}); chmod 600 it`,
      )
    text = await readFile(path, 'utf8')
  } catch (err) {
    if (err instanceof NetworkKeyError) throw err
    throw new NetworkKeyError(`cannot read network key ${path}: ${(err as Error).message}`, { cause: err })
  }
  return decodeNetworkKey(text)
}

/** 32-byte pnet pre-shared key, derived from the network PUBLIC key: every invite holder can compute it,
 *  which is what we want — pnet keeps out strangers scanning the port, admission keeps out the rest. */
export function pnetKeyOf(network: NetworkInfo): Uint8Array {
  const psk = createHash('sha256')
    .update('mesh-pnet-v1')
    .update(network.publicKey)
    .update(network.id)
    .digest('hex')
  return new TextEncoder().encode(`/key/swarm/psk/1.0.0/\n/base16/\n${psk}`)
}

export function randomNonce(): string {
  return b64u(randomBytes(16))
}
