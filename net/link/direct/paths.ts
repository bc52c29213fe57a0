import { randomBytes } from 'node:crypto'
import type { Connection, Stream } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { type Multiaddr, multiaddr } from '@multiformats/multiaddr'
import type { Libp2p } from 'libp2p'
import { onAbort } from '../../../src/base/abort.ts'
import { describeError } from '../../../src/base/errors.ts'
import { type Logger, silentLogger } from '../../../src/base/log.ts'
import { FramedStream } from '../../control/stream.ts'
import type { TransportAddress } from '../../stun/client.ts'
import type { Signaling, SignalMessage } from '../../webrtc/interfaces.ts'
import { type BulkPath, type ChannelName, MAX_MESSAGE_SIZE } from '../interfaces.ts'
import { StreamChannel } from './channels.ts'
import type { PathLink } from './link.ts'
import { formatAddr, parseAddr, preparePunch, punchTcp } from './punch.ts'
import { DIRECT_CHANNELS, DIRECT_PROTOCOL, decodeHello, encodeHello, TOKEN_BYTES } from './v1/messages.ts'

export { DIRECT_PROTOCOL } from './v1/messages.ts'

/** Timings of the upgrade. It runs after the link is up, so none of them delays a link. They are
 *  sized for WAN paths (120 ms RTT, lost SYNs resent after 1 s and 3 s), not for a LAN. */
export interface DirectTiming {
  /** One direct dial attempt (an unreachable NAT'd address silently drops the SYN). Default 4 s. */
  dialMs?: number
  /** Waiting for the peer's next negotiation message. Default 20 s. */
  replyMs?: number
  /** An inbound stream's hello, and how long an unclaimed stream is kept. Default 15 s. */
  pendingMs?: number
  /** Learning this host's TCP mapping from a STUN server. Default 5 s. */
  stunMs?: number
  /** The TCP hole punch, from the address exchange to an upgraded connection. Default 12 s. */
  punchMs?: number
}

export interface DirectPathsInit {
  libp2p: () => Libp2p | undefined
  /** Addresses the peer advertised (member hints); the peer store's are added. */
  hints: (peer: string) => readonly string[]
  /** Off: refuse every offer and never dial (the bulk channels stay on the WebRTC link). */
  enabled: boolean
  /** STUN-over-TCP servers (the bootstraps') to learn this host's TCP mapping before a hole punch;
   *  none: no punching. */
  stunServers?: () => readonly TransportAddress[]
  /** When neither end can dial or punch, carry the bulk channels over the relayed libp2p connection
   *  (circuit relay through a bootstrap) instead of the WebRTC link. Default true. */
  relay?: boolean
  timing?: DirectTiming
  log?: Logger
}

/** Negotiation messages of one link, captured from the moment its signaling stream exists. */
type NegotiationMessage = SignalMessage & { type: 'direct' | 'direct-ack' | 'punch' }

export interface DirectInbox {
  next(signal: AbortSignal, timeoutMs: number): Promise<NegotiationMessage>
  close(): void
}

export interface DirectPaths {
  /** The `/mesh/direct/1` handler (the node wraps it in its member guard). */
  handle(stream: Stream, connection: Connection): Promise<void>
  inbox(signaling: Signaling): DirectInbox
  /**
   * Tries to move `link`'s bulk channels onto a TCP path — a direct dial either way, else a TCP hole
   * punch, else the relayed connection through a bootstrap — and resolves when it did, or decided not
   * to (disabled on either side, nothing works, timeouts). Never throws.
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

/** How a connection reaches the peer, as `mesh peers` shows it. */
function bulkPathOf(conn: Connection | undefined, punched: boolean): BulkPath {
  if (conn?.remoteAddr.toString().includes('/p2p-circuit') === true) return 'tcp-relay'
  return punched ? 'tcp-punch' : 'tcp'
}

function isDirectTcp(ma: Multiaddr): boolean {
  const s = ma.toString()
  return !s.includes('/p2p-circuit') && /^\/(ip4|ip6|dns4|dns6|dns)\/[^/]+\/tcp\/\d+/.test(s)
}

export function createDirectPaths(init: DirectPathsInit): DirectPaths {
  const dialMs = init.timing?.dialMs ?? 4000
  const replyMs = init.timing?.replyMs ?? 20_000
  const pendingMs = init.timing?.pendingMs ?? 15_000
  const stunMs = init.timing?.stunMs ?? 5000
  const punchMs = init.timing?.punchMs ?? 12_000
  const relayBulk = init.relay !== false
  /** Connections that came from a hole punch (for the path shown). */
  const punchedConns = new WeakSet<Connection>()
  const log = init.log ?? silentLogger
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
      log.info(`direct path to ${peer}: no direct connection (${describeError(err)})`)
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
    // A relayed connection carries no runOnLimitedConnection streams: only an unlimited one is used.
    if (conn.limits !== undefined) return false
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
      log.info(`direct path to ${link.peer}: cannot open streams (${describeError(err)})`)
      return false
    }
    signaling.send({ v: 1, session: SESSION, type: 'direct', token: tokenString(token) })
    let accepted = false
    try {
      const reply = await inbox.next(signal, replyMs)
      accepted = reply.type === 'direct-ack' && reply.ok
    } catch (err) {
      log.info(`direct path to ${link.peer}: no answer (${describeError(err)})`)
    }
    if (!accepted || link.state === 'closed') {
      abortAll(new Error('direct path refused'))
      return false
    }
    upgrade(link, opened, conn, punchedConns.has(conn))
    return true
  }

  /** The peer offered a token: claim its streams, answer, upgrade. */
  const accept = async (
    link: PathLink,
    token: string,
    signaling: Signaling,
    signal: AbortSignal,
    punched = false,
  ) => {
    const key = `${link.peer} ${token}`
    const complete = () => (pending.get(key)?.size ?? 0) === DIRECT_CHANNELS.length
    if (!complete()) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer)
          claimWaiters.delete(key)
          offAbort()
          resolve()
        }
        const timer = setTimeout(done, pendingMs)
        claimWaiters.set(key, () => {
          if (complete()) done()
        })
        const offAbort = onAbort(signal, done)
      })
    }
    const streams = pending.get(key)
    pending.delete(key)
    const first = streams?.values().next().value
    const conn = first === undefined ? undefined : connectionOf(first)
    // This end may refuse the bootstrap's relay for bulk (--no-relay-bulk) even when the peer offers it.
    const relayRefused = !relayBulk && bulkPathOf(conn, false) === 'tcp-relay'
    const ok =
      streams !== undefined &&
      streams.size === DIRECT_CHANNELS.length &&
      link.state !== 'closed' &&
      !relayRefused
    signaling.send({ v: 1, session: SESSION, type: 'direct-ack', ok })
    if (!ok) {
      for (const f of streams?.values() ?? []) f.abort(new Error('direct path incomplete'))
      return
    }
    upgrade(link, streams, conn, punched || (conn !== undefined && punchedConns.has(conn)))
  }

  const connections = new WeakMap<FramedStream, Connection>()
  const connectionOf = (f: FramedStream): Connection | undefined => connections.get(f)

  const upgrade = (
    link: PathLink,
    streams: Map<ChannelName, FramedStream>,
    conn: Connection | undefined,
    punched: boolean,
  ) => {
    const channels = new Map<ChannelName, StreamChannel>()
    for (const [name, f] of streams) channels.set(name, new StreamChannel(name, f))
    const remote = conn?.remoteAddr.toString() ?? 'direct'
    const via = bulkPathOf(conn, punched)
    link.upgrade(channels, { remote, via })
    log.info(`direct path to ${link.peer}: bulk channels now on ${remote} (${via})`)
  }

  /** The relayed (circuit) connection to the peer, if it is unlimited: the last resort for bulk. */
  const relayedConnection = (peer: string): Connection | undefined =>
    init
      .libp2p()
      ?.getConnections(peerIdFromString(peer))
      .find((c) => c.status === 'open' && !c.direct && c.limits === undefined)

  /** Learns this host's TCP mapping, if punching is possible at all. */
  const prepare = async (peer: string, signal: AbortSignal) => {
    const servers = init.stunServers?.() ?? []
    const prep = await preparePunch(servers, signal, stunMs)
    if (!prep.ok) log.info(`direct path to ${peer}: no TCP punch from here (${prep.why})`)
    return prep.ok ? prep.plan : undefined
  }

  /** Punches and marks the connection; undefined when it did not work. */
  const punch = async (
    peer: string,
    plan: { localPort: number },
    remote: TransportAddress,
    initiator: boolean,
    signal: AbortSignal,
  ): Promise<Connection | undefined> => {
    const node = init.libp2p()
    if (node === undefined) return undefined
    try {
      const conn = await punchTcp({
        node,
        peer,
        localPort: plan.localPort,
        remote,
        initiator,
        signal: AbortSignal.any([signal, AbortSignal.timeout(punchMs)]),
        log,
      })
      punchedConns.add(conn)
      return conn
    } catch (err) {
      if (!signal.aborted) log.info(`direct path to ${peer}: ${describeError(err)}`)
      return undefined
    }
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
        log.info(`direct path from ${peer}: ${describeError(err)}`)
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
      const queue: NegotiationMessage[] = []
      let wake: (() => void) | undefined
      const off = signaling.onMessage((m) => {
        if (m.type !== 'direct' && m.type !== 'direct-ack' && m.type !== 'punch') return
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
                offAbort()
                wake = undefined
              }
              const timer = setTimeout(() => {
                done()
                reject(new Error(`no direct-path message within ${timeoutMs} ms`))
              }, timeoutMs)
              wake = () => {
                done()
                resolve()
              }
              const offAbort = onAbort(signal, (reason) => {
                done()
                reject(reason instanceof Error ? reason : new Error('aborted'))
              })
            })
          }
        },
        close: off,
      }
    },

    async negotiate(link, { signaling, inbox, initiator, signal }) {
      const peer = link.peer
      const send = (
        m: NegotiationMessage extends infer T
          ? T extends unknown
            ? Omit<T, 'v' | 'session'>
            : never
          : never,
      ) => signaling.send({ v: 1, session: SESSION, ...m } as NegotiationMessage)
      try {
        if (!init.enabled) {
          send({ type: 'direct-ack', ok: false })
          return
        }
        // Phase 1, a plain dial: the link's initiator (lower PeerId) moves first, so the two ends never
        // both dial.
        if (initiator) {
          const conn = await directConnection(peer, signal)
          if (conn !== undefined) {
            await offer(link, conn, signaling, inbox, signal) // refused or failed: keep WebRTC
            return
          }
          send({ type: 'direct' }) // "I cannot reach you; try me"
          // The responder dials, then (failing that) asks STUN before it answers.
          const reply = await inbox.next(signal, replyMs + dialMs + stunMs)
          if (reply.type === 'direct' && reply.token !== undefined) {
            await accept(link, reply.token, signaling, signal)
            return
          }
          if (reply.type !== 'punch') return // the peer has direct paths off
          // Phase 2, neither end can dial: a TCP hole punch when both NATs keep ports; the responder
          // sent its address (or none: it cannot punch).
          const theirs = reply.addr === undefined ? undefined : parseAddr(reply.addr)
          const plan = theirs === undefined ? undefined : await prepare(peer, signal)
          send(plan === undefined ? { type: 'punch' } : { type: 'punch', addr: formatAddr(plan.mapped) })
          if (plan !== undefined && theirs !== undefined) {
            const punched = await punch(peer, plan, theirs, true, signal)
            if (punched !== undefined) {
              await offer(link, punched, signaling, inbox, signal)
              return
            }
          }
          // Phase 3: the relayed connection through a bootstrap (TCP both legs) beats the WebRTC
          // link for bulk (see README); else stay on WebRTC.
          const relayed = relayBulk ? relayedConnection(peer) : undefined
          if (relayed !== undefined) await offer(link, relayed, signaling, inbox, signal)
          else send({ type: 'direct-ack', ok: false })
          return
        }
        const first = await inbox.next(signal, replyMs + dialMs)
        if (first.type === 'direct-ack') return // the initiator has direct paths off
        if (first.type === 'direct' && first.token !== undefined) {
          await accept(link, first.token, signaling, signal)
          return
        }
        const conn = await directConnection(peer, signal)
        if (conn !== undefined) {
          await offer(link, conn, signaling, inbox, signal)
          return
        }
        const plan = await prepare(peer, signal)
        send(plan === undefined ? { type: 'punch' } : { type: 'punch', addr: formatAddr(plan.mapped) })
        let next = await inbox.next(signal, replyMs + stunMs)
        let punching = false
        if (next.type === 'punch') {
          const theirs = next.addr === undefined ? undefined : parseAddr(next.addr)
          if (plan !== undefined && theirs !== undefined) {
            punching = true
            // Not awaited: the initiator opens its streams on the punched connection as soon as its
            // end is up, and says so with a token on the signaling stream.
            void punch(peer, plan, theirs, false, signal)
          }
          next = await inbox.next(signal, replyMs + punchMs)
        }
        if (next.type === 'direct' && next.token !== undefined)
          await accept(link, next.token, signaling, signal, punching)
      } catch (err) {
        if (!signal.aborted) log.info(`direct path to ${peer}: ${describeError(err)}; staying on WebRTC`)
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
