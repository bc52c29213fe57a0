import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError, MeshError, throwIfAborted } from '../../src/base/errors.ts'
import { type Logger, silentLogger } from '../../src/base/log.ts'
import type { Link, Overlay } from '../link/interfaces.ts'
import { openLink } from '../link/open.ts'
import {
  DIAG_VERSION,
  DiagType,
  decodeCount,
  decodeDiag,
  encodeCount,
  encodeDiag,
  MAX_DIAG_PAYLOAD,
} from './v1/messages.ts'

export class DiagError extends MeshError {}

/** How long a ping or bench waits for a link built on demand (a few seconds through two NATs). */
const LINK_BUILD_MS = 15_000

export interface BenchResult {
  bytes: number
  seconds: number
  /** MB/s (10^6 bytes per second), counted when the receiver confirms it got every byte. */
  mbps: number
}

export interface Diag {
  /** Round-trip time over the link's control channel, in ms. */
  ping(peer: string, options?: { signal?: AbortSignal; timeoutMs?: number }): Promise<number>
  /** Sends `bytes` to the peer with backpressure and waits for its receipt. */
  bench(peer: string, bytes: number, options?: { signal?: AbortSignal }): Promise<BenchResult>
  stop(): void
}

type Waiter = (payload: Uint8Array) => void

/** Answers pings and bench transfers on every link, and measures them on request. */
export function createDiag(overlay: Overlay, log: Logger = silentLogger): Diag {
  const waiters = new Map<string, Waiter>() // `${peer}/${type}/${seq}`
  const received = new Map<string, number>() // bench bytes per peer
  const cleanups = new Set<() => void>()
  let seq = 1

  const attach = (link: Link) => {
    const ch = link.channel('control')
    const off = ch.onMessage((bytes) => {
      // The control channel is shared: other protocols start with their own first byte (net/directory
      // 0x44, agent calls 0x10).
      if (bytes[0] !== DIAG_VERSION) return
      let msg: ReturnType<typeof decodeDiag>
      try {
        msg = decodeDiag(bytes)
      } catch (err) {
        log.warn(`diag: dropping bad message from ${link.peer}: ${(err as Error).message}`)
        return
      }
      switch (msg.type) {
        case DiagType.Ping:
          ch.send(encodeDiag(DiagType.Pong, msg.seq))
          break
        case DiagType.Data:
          received.set(link.peer, (received.get(link.peer) ?? 0) + msg.payload.byteLength)
          break
        case DiagType.End:
          ch.send(encodeDiag(DiagType.Done, msg.seq, encodeCount(received.get(link.peer) ?? 0)))
          received.delete(link.peer)
          break
        default:
          waiters.get(`${link.peer}/${msg.type}/${msg.seq}`)?.(msg.payload)
      }
    })
    cleanups.add(off)
    link.onClose(() => {
      off()
      cleanups.delete(off)
      received.delete(link.peer)
    })
  }
  for (const l of overlay.links()) attach(l)
  const offLink = overlay.onLink(attach)

  /** The link to `peer`, built on demand where the overlay does that (a member outside its warm set). */
  const linkTo = async (peer: string, signal: AbortSignal | undefined): Promise<Link> => {
    let l: Link | undefined
    try {
      l = await openLink(overlay, peer, {
        timeoutMs: LINK_BUILD_MS,
        ...(signal === undefined ? {} : { signal }),
      })
    } catch (err) {
      if (err instanceof AbortError) throw err
      throw new DiagError(`no open link to ${peer}: ${describeError(err)}`, { code: 'E_NO_LINK', cause: err })
    }
    if (l === undefined || l.state !== 'open')
      throw new DiagError(`no open link to ${peer}`, { code: 'E_NO_LINK' })
    return l
  }

  const await_ = (
    peer: string,
    type: DiagType,
    s: number,
    signal: AbortSignal | undefined,
    timeoutMs: number,
  ) =>
    new Promise<Uint8Array>((resolve, reject) => {
      const key = `${peer}/${type}/${s}`
      const timer = setTimeout(() => {
        done()
        reject(new DiagError(`no answer from ${peer} within ${timeoutMs} ms`, { code: 'E_TIMEOUT' }))
      }, timeoutMs)
      const abortNow = () => {
        done()
        reject(new AbortError(undefined, { cause: signal?.reason }))
      }
      const done = () => {
        clearTimeout(timer)
        waiters.delete(key)
        offAbort()
      }
      waiters.set(key, (p) => {
        done()
        resolve(p)
      })
      const offAbort = onAbort(signal, abortNow)
    })

  return {
    async ping(peer, options = {}) {
      throwIfAborted(options.signal)
      // The link first: a waiter set up for a ping that never leaves would reject later, unheard
      // (an unhandled rejection ends the agent).
      const ch = (await linkTo(peer, options.signal)).channel('control')
      const s = seq++
      const t0 = performance.now()
      const reply = await_(peer, DiagType.Pong, s, options.signal, options.timeoutMs ?? 5000)
      try {
        ch.send(encodeDiag(DiagType.Ping, s))
      } catch (err) {
        reply.catch(() => {})
        throw err
      }
      await reply
      return performance.now() - t0
    },
    async bench(peer, bytes, options = {}) {
      const { signal } = options
      const ch = (await linkTo(peer, signal)).channel('control')
      const block = new Uint8Array(MAX_DIAG_PAYLOAD)
      for (let i = 0; i < block.length; i++) block[i] = (i * 131) & 0xff
      const t0 = performance.now()
      let sent = 0
      while (sent < bytes) {
        throwIfAborted(signal)
        const n = Math.min(block.length, bytes - sent)
        const ok = ch.send(encodeDiag(DiagType.Data, 0, n === block.length ? block : block.subarray(0, n)))
        sent += n
        if (!ok) await ch.onDrain({ signal })
      }
      const s = seq++
      const done = await_(peer, DiagType.Done, s, signal, 60_000)
      try {
        ch.send(encodeDiag(DiagType.End, s))
      } catch (err) {
        done.catch(() => {})
        throw err
      }
      const got = decodeCount(await done)
      const seconds = (performance.now() - t0) / 1000
      if (got !== bytes)
        throw new DiagError(`peer counted ${got} bytes of ${bytes}`, { code: 'E_BENCH_LOSS' })
      return { bytes, seconds, mbps: bytes / 1e6 / seconds }
    },
    stop() {
      offLink()
      for (const off of cleanups) off()
      cleanups.clear()
      waiters.clear()
    },
  }
}
