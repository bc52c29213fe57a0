/**
 * The VM directory: asks every linked member which VMs it runs, and answers the same question for this
 * host (see v1/messages.ts). Names then work from any member: `mesh expose g1:80` on a host that does
 * not run g1, `mesh vm ls --all`, the web view. Nothing is cached: a VM that moved is found where it
 * runs now.
 */

import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError } from '../../src/base/errors.ts'
import { type Logger, silentLogger } from '../../src/base/log.ts'
import type { Link, Overlay } from '../link/interfaces.ts'
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

export interface Directory {
  /** Every linked member's VMs (the ones that answered within timeoutMs; others carry `error`). */
  list(options?: { vm?: string; timeoutMs?: number; signal?: AbortSignal }): Promise<PeerVms[]>
  /** The member running the named VM (running or paused wins over exited), if any answers. */
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
  log?: Logger
}

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

  const list: Directory['list'] = async (options = {}) => {
    const links = init.overlay.links().filter((l) => l.state === 'open')
    return Promise.all(
      links.map((l) =>
        ask(l, options.vm, options.timeoutMs ?? 3000, options.signal).then(
          (r) => ({ peer: l.peer, ...r }),
          (err: unknown) => {
            if (err instanceof AbortError) throw err
            return { peer: l.peer, vms: [], error: describeError(err) }
          },
        ),
      ),
    )
  }

  return {
    list,
    async find(vm, options = {}) {
      let best: { peer: string; vm: VmEntry } | undefined
      for (const p of await list({ ...options, vm })) {
        for (const v of p.vms) {
          if (v.name !== vm) continue
          if (best === undefined || (RANK[v.status] ?? 0) > (RANK[best.vm.status] ?? 0))
            best = { peer: p.peer, vm: v }
        }
      }
      return best
    },
    stop() {
      for (const off of offs) off()
      offs.clear()
      waiters.clear()
    },
  }
}
