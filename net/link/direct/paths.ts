import { randomBytes } from 'node:crypto'
import type { Connection, Stream } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { type Multiaddr, multiaddr } from '@multiformats/multiaddr'
import type { Libp2p } from 'libp2p'
import { describeError } from '../../../src/base/errors.ts'
import { FramedStream } from '../../control/stream.ts'
import type { Signaling, SignalMessage } from '../../webrtc/interfaces.ts'
import { type ChannelName, MAX_MESSAGE_SIZE } from '../interfaces.ts'
import { StreamChannel } from './channels.ts'
import type { PathLink } from './link.ts'
import { DIRECT_CHANNELS, DIRECT_PROTOCOL, decodeHello, encodeHello, TOKEN_BYTES } from './v1/messages.ts'

export { DIRECT_PROTOCOL } from './v1/messages.ts'

/** Timings of the upgrade. It runs after the link is up, so none of them delays a link. */
export interface DirectTiming {
  /** One direct dial attempt (an unreachable NAT'd address silently drops the SYN). Default 4 s. */
  dialMs?: number
  /** Waiting for the peer's next negotiation message. Default 20 s. */
  replyMs?: number
  /** An inbound stream's hello, and how long an unclaimed stream is kept. Default 15 s. */
  pendingMs?: number
}

export interface DirectPathsInit {
  libp2p: () => Libp2p | undefined
  /** Addresses the peer advertised (member hints); the peer store's are added. */
  hints: (peer: string) => readonly string[]
  /** Off: refuse every offer and never dial (the bulk channels stay on the WebRTC link). */
  enabled: boolean
  timing?: DirectTiming
  log?: (line: string) => void
}

/** Negotiation messages of one link, captured from the moment its signaling stream exists. */
export interface DirectInbox {
  next(signal: AbortSignal, timeoutMs: number): Promise<SignalMessage & { type: 'direct' | 'direct-ack' }>
  close(): void
}

export interface DirectPaths {
  /** The `/mesh/direct/1` handler (the node wraps it in its member guard). */
  handle(stream: Stream, connection: Connection): Promise<void>
  inbox(signaling: Signaling): DirectInbox
  /**
   * Tries to move `link`'s bulk channels onto a direct connection; resolves when it did, or decided
   * not to (no direct reachability either way, disabled on either side, timeouts). Never throws.
   */
  negotiate(
    link: PathLink,
    init: { signaling: Signaling; inbox: DirectInbox; initiator: boolean; signal: AbortSignal },
  ): Promise<void>
  stop(): void
}

const SESSION = 'direct'
const MAX_PENDING_PER_PEER = 8

function tokenString(token: Uint8Array): string {
  return Buffer.from(token).toString('base64url')
}

function isDirectTcp(ma: Multiaddr): boolean {
  const s = ma.toString()
  return !s.includes('/p2p-circuit') && /^\/(ip4|ip6|dns4|dns6|dns)\/[^/]+\/tcp\/\d+/.test(s)
}

export function createDirectPaths(init: DirectPathsInit): DirectPaths {
  const dialMs = init.timing?.dialMs ?? 4000
  const replyMs = init.timing?.replyMs ?? 20_000
  const pendingMs = init.timing?.pendingMs ?? 15_000
  const log = init.log ?? (() => {})
  // Inbound streams waiting to be claimed by their link's negotiation: `${peer} ${token}` → channel → stream.
  const pending = new Map<string, Map<ChannelName, FramedStream>>()
  const claimWaiters = new Map<string, () => void>()
  const timers = new Set<NodeJS.Timeout>()

  const dropPending = (key: string, why: Error) => {
    const streams = pending.get(key)
    pending.delete(key)
    for (const f of streams?.values() ?? []) f.abort(why)
  }

  const directConnection = async (peer: string, signal: AbortSignal): Promise<Connection | undefined> => {
    const node = init.libp2p()
    if (node === undefined) return undefined
    const id = peerIdFromString(peer)
    const open = node
      .getConnections(id)
      .find((c) => c.status === 'open' && c.direct && c.limits === undefined)
    if (open !== undefined) return open
    const addrs = new Map<string, Multiaddr>()
    const add = (ma: Multiaddr) => {
      if (!isDirectTcp(ma)) return
      const bare = ma.toString().replace(/\/p2p\/[^/]+$/, '')
      addrs.set(bare, multiaddr(`${bare}/p2p/${peer}`))
    }
    for (const h of init.hints(peer)) {
      try {
        add(multiaddr(h))
      } catch {
        // A malformed hint is the peer's problem; other addresses may still work.
      }
    }
    try {
      for (const a of (await node.peerStore.get(id)).addresses) add(a.multiaddr)
    } catch {
      // Not in the peer store (yet): the hints are all we have.
    }
    if (addrs.size === 0) return undefined
    try {
      const conn = await node.dial([...addrs.values()], {
        signal: AbortSignal.any([signal, AbortSignal.timeout(dialMs)]),
      })
      return conn.direct && conn.limits === undefined ? conn : undefined
    } catch (err) {
      log(`direct path to ${peer}: no direct connection (${describeError(err)})`)
      return undefined
    }
  }

  /** We reach the peer: open one stream per bulk channel, offer the token, upgrade if it accepts. */
  const offer = async (
    link: PathLink,
    conn: Connection,
    signaling: Signaling,
    inbox: DirectInbox,
    signal: AbortSignal,
  ): Promise<boolean> => {
    const token = new Uint8Array(randomBytes(TOKEN_BYTES))
    const opened = new Map<ChannelName, FramedStream>()
    const abortAll = (why: Error) => {
      for (const f of opened.values()) f.abort(why)
    }
    try {
      for (const name of DIRECT_CHANNELS) {
        const stream = await conn.newStream(DIRECT_PROTOCOL, { signal })
        const framed = new FramedStream(stream, MAX_MESSAGE_SIZE)
        opened.set(name, framed)
        framed.write(encodeHello({ channel: name, token }))
      }
    } catch (err) {
      abortAll(err as Error)
      log(`direct path to ${link.peer}: cannot open streams (${describeError(err)})`)
      return false
    }
    signaling.send({ v: 1, session: SESSION, type: 'direct', token: tokenString(token) })
    let accepted = false
    try {
      const reply = await inbox.next(signal, replyMs)
      accepted = reply.type === 'direct-ack' && reply.ok
    } catch (err) {
      log(`direct path to ${link.peer}: no answer (${describeError(err)})`)
    }
    if (!accepted || link.state === 'closed') {
      abortAll(new Error('direct path refused'))
      return false
    }
    upgrade(link, opened, conn)
    return true
  }

  /** The peer offered a token: claim its streams, answer, upgrade. */
  const accept = async (link: PathLink, token: string, signaling: Signaling, signal: AbortSignal) => {
    const key = `${link.peer} ${token}`
    const complete = () => (pending.get(key)?.size ?? 0) === DIRECT_CHANNELS.length
    if (!complete()) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer)
          claimWaiters.delete(key)
          signal.removeEventListener('abort', done)
          resolve()
        }
        const timer = setTimeout(done, pendingMs)
        claimWaiters.set(key, () => {
          if (complete()) done()
        })
        signal.addEventListener('abort', done, { once: true })
      })
    }
    const streams = pending.get(key)
    pending.delete(key)
    const ok = streams !== undefined && streams.size === DIRECT_CHANNELS.length && link.state !== 'closed'
    signaling.send({ v: 1, session: SESSION, type: 'direct-ack', ok })
    if (!ok) {
      for (const f of streams?.values() ?? []) f.abort(new Error('direct path incomplete'))
      return
    }
    const conn = streams.values().next().value as FramedStream
    upgrade(link, streams, connectionOf(conn))
  }

  const connections = new WeakMap<FramedStream, Connection>()
  const connectionOf = (f: FramedStream): Connection | undefined => connections.get(f)

  const upgrade = (link: PathLink, streams: Map<ChannelName, FramedStream>, conn: Connection | undefined) => {
    const channels = new Map<ChannelName, StreamChannel>()
    for (const [name, f] of streams) channels.set(name, new StreamChannel(name, f))
    const remote = conn?.remoteAddr.toString() ?? 'direct'
    link.upgrade(channels, { remote })
    log(`direct path to ${link.peer}: bulk channels now on ${remote}`)
  }

  return {
    async handle(stream, connection) {
      const peer = connection.remotePeer.toString()
      const framed = new FramedStream(stream, MAX_MESSAGE_SIZE)
      if (!init.enabled) {
        framed.abort(new Error('direct paths are off here'))
        return
      }
      let hello: ReturnType<typeof decodeHello>
      try {
        hello = decodeHello(await framed.read({ timeoutMs: pendingMs, what: 'direct hello' }))
      } catch (err) {
        log(`direct path from ${peer}: ${describeError(err)}`)
        framed.abort(err as Error)
        return
      }
      const key = `${peer} ${tokenString(hello.token)}`
      let streams = pending.get(key)
      if (streams === undefined) {
        const perPeer = [...pending.keys()].filter((k) => k.startsWith(`${peer} `)).length
        if (perPeer >= MAX_PENDING_PER_PEER) {
          framed.abort(new Error('too many pending direct streams'))
          return
        }
        streams = new Map()
        pending.set(key, streams)
        const timer = setTimeout(() => {
          timers.delete(timer)
          dropPending(key, new Error('direct stream never claimed'))
        }, pendingMs)
        timers.add(timer)
      }
      if (streams.has(hello.channel)) {
        framed.abort(new Error(`second '${hello.channel}' stream for one token`))
        return
      }
      connections.set(framed, connection)
      streams.set(hello.channel, framed)
      claimWaiters.get(key)?.()
    },

    inbox(signaling) {
      const queue: (SignalMessage & { type: 'direct' | 'direct-ack' })[] = []
      let wake: (() => void) | undefined
      const off = signaling.onMessage((m) => {
        if (m.type !== 'direct' && m.type !== 'direct-ack') return
        if (queue.length >= 8) return // a peer follows the script or gets nothing more read
        queue.push(m)
        wake?.()
      })
      return {
        async next(signal, timeoutMs) {
          for (;;) {
            const m = queue.shift()
            if (m !== undefined) return m
            await new Promise<void>((resolve, reject) => {
              const done = () => {
                clearTimeout(timer)
                signal.removeEventListener('abort', onAbort)
                wake = undefined
              }
              const timer = setTimeout(() => {
                done()
                reject(new Error(`no direct-path message within ${timeoutMs} ms`))
              }, timeoutMs)
              const onAbort = () => {
                done()
                reject(signal.reason instanceof Error ? signal.reason : new Error('aborted'))
              }
              wake = () => {
                done()
                resolve()
              }
              if (signal.aborted) onAbort()
              else signal.addEventListener('abort', onAbort, { once: true })
            })
          }
        },
        close: off,
      }
    },

    async negotiate(link, { signaling, inbox, initiator, signal }) {
      try {
        if (!init.enabled) {
          signaling.send({ v: 1, session: SESSION, type: 'direct-ack', ok: false })
          return
        }
        // The link's initiator (lower PeerId) moves first, so the two ends never both dial.
        if (initiator) {
          const conn = await directConnection(link.peer, signal)
          if (conn !== undefined) {
            await offer(link, conn, signaling, inbox, signal) // refused or failed: keep WebRTC
            return
          }
          signaling.send({ v: 1, session: SESSION, type: 'direct' }) // "I cannot reach you; try me"
          const reply = await inbox.next(signal, replyMs + dialMs)
          if (reply.type === 'direct' && reply.token !== undefined)
            await accept(link, reply.token, signaling, signal)
          return
        }
        const first = await inbox.next(signal, replyMs + dialMs)
        if (first.type === 'direct-ack') return // the initiator has direct paths off
        if (first.token !== undefined) {
          await accept(link, first.token, signaling, signal)
          return
        }
        const conn = await directConnection(link.peer, signal)
        if (conn === undefined) signaling.send({ v: 1, session: SESSION, type: 'direct-ack', ok: false })
        else await offer(link, conn, signaling, inbox, signal)
      } catch (err) {
        if (!signal.aborted) log(`direct path to ${link.peer}: ${describeError(err)}; staying on WebRTC`)
      } finally {
        inbox.close()
      }
    },

    stop() {
      for (const t of timers) clearTimeout(t)
      timers.clear()
      for (const key of [...pending.keys()]) dropPending(key, new Error('stopping'))
    },
  }
}
