import { chmod, mkdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys'
import type { PeerId, PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { MeshError } from '../../src/base/errors.ts'
import { writeFileDurable } from '../../src/base/fs.ts'

/** The identity file exists but cannot be used (corrupt, wrong key type, unreadable). */
export class IdentityError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_IDENTITY' })
  }
}

export interface Identity {
  readonly privateKey: PrivateKey
  readonly peerId: PeerId
}

export const IDENTITY_FILE = 'identity.key'

/**
 * Loads `<stateDir>/identity.key` (a libp2p protobuf-encoded Ed25519 private key), creating it on first
 * use. The file is created exclusively (O_EXCL) with mode 0600 so two agents starting at once cannot
 * end up with different identities, and the key is never world-readable even for an instant.
 */
export async function loadOrCreateIdentity(stateDir: string): Promise<Identity> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 })
  const path = join(stateDir, IDENTITY_FILE)
  try {
    return await load(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
  }
  const key = await generateKeyPair('Ed25519')
  try {
    await writeFileDurable(path, privateKeyToProtobuf(key), { exclusive: true, mode: 0o600 })
  } catch (err) {
    // Lost a creation race: the other process's key is the identity.
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return load(path)
    throw new IdentityError(`cannot create ${path}: ${(err as Error).message}`, { cause: err })
  }
  await chmod(path, 0o600)
  return { privateKey: key, peerId: peerIdFromPrivateKey(key) }
}

async function load(path: string): Promise<Identity> {
  const bytes = await readFile(path)
  let key: PrivateKey
  try {
    key = privateKeyFromProtobuf(bytes)
  } catch (err) {
    throw new IdentityError(`${path} is not a valid identity key (delete it to create a new identity)`, {
      cause: err,
    })
  }
  if (key.type !== 'Ed25519') throw new IdentityError(`${path} holds a ${key.type} key, expected Ed25519`)
  return { privateKey: key, peerId: peerIdFromPrivateKey(key) }
}
