/**
 * The VM directory: asks every linked member which VMs it runs, and answers the same question for this
 * host (see v1/messages.ts). Names then work from any member: `mesh expose g1:80` on a host that does
 * not run g1, `mesh vm ls --all`, the web view. Nothing is cached: a VM that moved is found where it
 * runs now.
 */

import { onAbort } from '../../src/base/abort.ts'
import { forEachLimit } from '../../src/base/concurrency.ts'
import { AbortError, describeError } from '../../src/base/errors.ts'
import { type Logger, silentLogger } from '../../src/base/log.ts'
import type { Link, Overlay } from '../link/interfaces.ts'
import { openLink } from '../link/open.ts'
import {
  DIRECTORY_TAG,
  type DirectoryMessage,
  DirectoryType,
  decodeDirectory,
  encodeDirectory,
  type VmEntry,
} from './v1/messages.ts'

export type { VmEntry } from './v1/messages.ts'

export interface PeerVms {
  peer: string
  vms: VmEntry[]
  /** Set when the member did not answer in time (its VMs are then unknown). */
  error?: string
  /** Its clock minus ours, estimated with half the round trip (ms). */
  skewMs?: number
  rttMs?: number
}

export interface ListOptions {
  vm?: string
  timeoutMs?: number
  signal?: AbortSignal
  /** Also ask the members this node keeps no link to (built on demand, a few at a time; large meshes
   *  keep links to a bounded set only). Default: linked members only (cheap, for periodic views). */
  everyone?: boolean
}

export interface Directory {
  /** Every linked member's VMs (the ones that answered within timeoutMs; others carry `error`). */
  list(options?: ListOptions): Promise<PeerVms[]>
  /** The member running the named VM (running or paused wins over exited), if any answers: the linked
   *  members first, then (when `members` was given) every other member through on-demand links. */
  find(
    vm: string,
    options?: { timeoutMs?: number; signal?: AbortSignal },
  ): Promise<{ peer: string; vm: VmEntry } | undefined>
  stop(): void
}

export interface DirectoryInit {
  overlay: Overlay
  /** This host's VMs. */
  local(): Promise<VmEntry[]>
  /** Every other member's PeerId: lets find() and list({everyone}) reach members with no link now. */
  members?: () => string[]
  log?: Logger
}

/** On-demand links built at once by one list/find (each is a DTLS+SCTP handshake on a loaded host). */
const OPEN_AT_ONCE = 8
/** How long an on-demand link may take to come up before that member counts as not answering. */
const OPEN_TIMEOUT_MS = 15_000

const RANK: Record<string, number> = { running: 3, paused: 2 }

export function createDirectory(init: DirectoryInit): Directory {
  const log = init.log ?? silentLogger
  const waiters = new Map<string, (reply: { vms: VmEntry[]; now?: number }) => void>() // `${peer}/${id}`
  const offs = new Set<() => void>()
  let nextId = 1

  const attach = (link: Link) => {
    const ch = link.channel('control')
    const off = ch.onMessage((bytes) => {
      if (bytes[0] !== DIRECTORY_TAG) return // another protocol on the shared control channel
      let msg: DirectoryMessage
      try {
        msg = decodeDirectory(bytes)
      } catch (err) {
        log.warn(`directory: dropping bad message from ${link.peer}: ${describeError(err)}`)
        return
      }
      if (msg.type === DirectoryType.Query) {
        const want = msg.vm
        init.local().then(
          (vms) => {
            if (ch.state !== 'open') return
            const list = want === undefined ? vms : vms.filter((v) => v.name === want)
            ch.send(encodeDirectory({ type: DirectoryType.Reply, id: msg.id, vms: list, now: Date.now() }))
          },
          (err: unknown) => log.warn(`directory: cannot list local VMs: ${describeError(err)}`),
        )
      } else waiters.get(`${link.peer}/${msg.id}`)?.(msg)
    })
    offs.add(off)
    link.onClose(() => {
      off()
      offs.delete(off)
    })
  }
  for (const l of init.overlay.links()) attach(l)
  offs.add(init.overlay.onLink(attach))

  const ask = (link: Link, vm: string | undefined, timeoutMs: number, signal?: AbortSignal) =>
    new Promise<{ vms: VmEntry[]; skewMs?: number; rttMs: number }>((resolve, reject) => {
      const t0 = Date.now()
      const id = nextId++ >>> 0
      const key = `${link.peer}/${id}`
      const done = () => {
        waiters.delete(key)
        clearTimeout(timer)
        offAbort()
      }
      const abortNow = () => {
        done()
        reject(new AbortError())
      }
      const timer = setTimeout(() => {
        done()
        reject(new Error(`no answer within ${timeoutMs} ms`))
      }, timeoutMs)
      const offAbort = onAbort(signal, abortNow)
      waiters.set(key, (reply) => {
        done()
        const t1 = Date.now()
        const rttMs = t1 - t0
        resolve({
          vms: reply.vms,
          rttMs,
          ...(reply.now === undefined ? {} : { skewMs: Math.round(reply.now - (t0 + rttMs / 2)) }),
        })
      })
      try {
        link
          .channel('control')
          .send(encodeDirectory({ type: DirectoryType.Query, id, ...(vm === undefined ? {} : { vm }) }))
      } catch (err) {
        done()
        reject(err)
      }
    })

  const askLinked = (l: Link, options: ListOptions): Promise<PeerVms> =>
    ask(l, options.vm, options.timeoutMs ?? 3000, options.signal).then(
      (r) => ({ peer: l.peer, ...r }),
      (err: unknown) => {
        if (err instanceof AbortError) throw err
        return { peer: l.peer, vms: [], error: describeError(err) }
      },
    )

  const askUnlinked = async (peer: string, options: ListOptions): Promise<PeerVms> => {
    let link: Link | undefined
    try {
      link = await openLink(init.overlay, peer, {
        timeoutMs: OPEN_TIMEOUT_MS,
        ...(options.signal === undefined ? {} : { signal: options.signal }),
      })
    } catch (err) {
      if (err instanceof AbortError) throw err
      return { peer, vms: [], error: `no link: ${describeError(err)}` }
    }
    if (link === undefined || link.state !== 'open') return { peer, vms: [], error: 'no link' }
    // A link built just now: attach() ran from onLink, so replies find their waiter.
    return askLinked(link, options)
  }

  /** The members with no open link, asked OPEN_AT_ONCE at a time; stops early once `enough` says so. */
  const askRest = async (
    skip: Set<string>,
    options: ListOptions,
    enough: (p: PeerVms) => boolean,
  ): Promise<PeerVms[]> => {
    const rest = (init.members?.() ?? []).filter((p) => p !== init.overlay.self && !skip.has(p))
    const out: PeerVms[] = []
    let done = false
    await forEachLimit(
      rest,
      OPEN_AT_ONCE,
      async (peer) => {
        const p = await askUnlinked(peer, options)
        out.push(p)
        if (enough(p)) done = true
      },
      () => done,
    )
    return out
  }

  const list: Directory['list'] = async (options = {}) => {
    const links = init.overlay.links().filter((l) => l.state === 'open')
    const linked = await Promise.all(links.map((l) => askLinked(l, options)))
    if (options.everyone !== true) return linked
    return [...linked, ...(await askRest(new Set(links.map((l) => l.peer)), options, () => false))]
  }

  const best = (answers: PeerVms[], vm: string) => {
    let b: { peer: string; vm: VmEntry } | undefined
    for (const p of answers) {
      for (const v of p.vms) {
        if (v.name !== vm) continue
        if (b === undefined || (RANK[v.status] ?? 0) > (RANK[b.vm.status] ?? 0)) b = { peer: p.peer, vm: v }
      }
    }
    return b
  }

  return {
    list,
    async find(vm, options = {}) {
      const linked = await list({ ...options, vm, everyone: false })
      const found = best(linked, vm)
      if (found !== undefined && (RANK[found.vm.status] ?? 0) > 0) return found
      // Not on a linked member (or only an exited copy): ask the others, until one runs it.
      const runs = (p: PeerVms) => p.vms.some((v) => v.name === vm && (RANK[v.status] ?? 0) > 0)
      const rest = await askRest(new Set(linked.map((p) => p.peer)), { ...options, vm }, runs)
      return best([...linked, ...rest], vm)
    },
    stop() {
      for (const off of offs) off()
      offs.clear()
      waiters.clear()
    },
  }
}
