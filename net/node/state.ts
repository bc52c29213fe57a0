/**
 * The member state file, STATE/network.json: the network (name and public key), the bootstrap
 * addresses this node knows, and every signed membership record. Records verify on their own, so the
 * file needs no integrity protection beyond being owner-only. It is written with writeFileDurable
 * (temp, fsync, rename, fsync dir): gossip would bring a lost record back from another member, but a
 * revocation lost to a power cut on a lone member would let the revoked peer in until then, and the
 * file changes rarely, so the fsync costs nothing that matters.
 */
import { mkdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describeError } from '../../src/base/errors.ts'
import { writeFileDurable } from '../../src/base/fs.ts'
import type { Logger } from '../../src/base/log.ts'
import { MembershipError } from '../membership/errors.ts'
import type { NetworkInfo } from '../membership/interfaces.ts'
import { decodeInvite } from '../membership/invite.ts'
import { MemberSet } from '../membership/member-set.ts'
import { b64u, networkInfoFromPublic } from '../membership/network.ts'
import type { MemberStateStore } from './interfaces.ts'

export const NETWORK_STATE_FILE = 'network.json'

export interface NetworkStateFile {
  readonly network: NetworkInfo
  readonly bootstrap: readonly string[]
  /** Unverified: MemberSet.merge checks each one. */
  readonly records: readonly unknown[]
}

export function networkStatePath(stateDir: string): string {
  return join(stateDir, NETWORK_STATE_FILE)
}

/** Reads STATE/network.json: undefined when there is none; MembershipError when it is corrupt. */
export async function readNetworkState(stateDir: string): Promise<NetworkStateFile | undefined> {
  const path = networkStatePath(stateDir)
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw err
  }
  let o: {
    v?: unknown
    network?: { name?: unknown; publicKey?: unknown }
    bootstrap?: unknown
    records?: unknown
  }
  try {
    o = JSON.parse(text)
  } catch (err) {
    throw new MembershipError(`${path} is corrupt`, { cause: err })
  }
  if (typeof o.network?.name !== 'string' || typeof o.network.publicKey !== 'string')
    throw new MembershipError(`${path} lacks the network`)
  return {
    network: networkInfoFromPublic(o.network.name, o.network.publicKey),
    bootstrap: Array.isArray(o.bootstrap) ? o.bootstrap.filter((b) => typeof b === 'string') : [],
    records: Array.isArray(o.records) ? o.records : [],
  }
}

/**
 * Bootstrap addresses a node in `stateDir` will use: the invite's (if it decodes) and the saved ones.
 * Neither a malformed invite nor a corrupt state file is an error here: admission and the node's own
 * load report those precisely, so this best-effort answer (used to derive STUN servers) stays quiet.
 */
export async function knownBootstrap(stateDir: string, invite?: string): Promise<string[]> {
  const out: string[] = []
  if (invite !== undefined) {
    try {
      out.push(...decodeInvite(invite.trim()).body.bootstrap)
    } catch {
      // reported by admission (InviteMalformedError)
    }
  }
  try {
    out.push(...((await readNetworkState(stateDir))?.bootstrap ?? []))
  } catch {
    // reported by the node when it loads the state (MembershipError)
  }
  return [...new Set(out)]
}

export function createMemberState(init: {
  stateDir: string
  bootstrap?: readonly string[]
  log: Logger
}): MemberStateStore {
  let network: NetworkInfo | undefined
  let set: MemberSet | undefined
  const bootstrap: string[] = [...(init.bootstrap ?? [])]
  let chain: Promise<unknown> = Promise.resolve()
  const addBootstrap = (addrs: readonly string[]) => {
    for (const b of addrs) if (!bootstrap.includes(b)) bootstrap.push(b)
  }

  return {
    get network() {
      return network
    },
    get set() {
      return set
    },
    get bootstrap() {
      return bootstrap
    },
    async load() {
      const file = await readNetworkState(init.stateDir)
      if (file === undefined) return
      const next = new MemberSet(file.network)
      await next.merge([...file.records])
      network = file.network
      set = next
      addBootstrap(file.bootstrap)
    },
    adopt(n, s) {
      network = n
      set = s
    },
    addBootstrap,
    isMember: (peer) => set?.isMember(peer) === true,
    isRevoked: (peer) => set?.isRevoked(peer) === true,
    persist() {
      const n = network
      const s = set
      if (n === undefined || s === undefined) return Promise.resolve()
      const path = networkStatePath(init.stateDir)
      const next = chain.then(async () => {
        await mkdir(init.stateDir, { recursive: true, mode: 0o700 })
        const body = JSON.stringify({
          v: 1,
          network: { name: n.name, id: n.id, publicKey: b64u(n.publicKey) },
          bootstrap,
          records: s.list(),
        })
        // The member set decides who may connect (revocations): durable, like every ownership record.
        await writeFileDurable(path, body, { mode: 0o600 })
      })
      chain = next.catch((err) => init.log.error(`cannot save member set: ${describeError(err)}`))
      return next
    },
    settled: () => chain.then(() => {}),
  }
}
