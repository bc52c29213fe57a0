/**
 * TCP hole punching between two NAT'd members (TCP simultaneous open), for the bulk channels.
 *
 * Each end asks a bootstrap's STUN-over-TCP responder which public address and port its NAT gives a
 * connection from a fresh local port. If the NAT kept the port (Linux masquerade does whenever it can;
 * a symmetric NAT picks a random one per connection, and then the mapping towards the peer cannot be
 * predicted: no punch), the two ends swap those addresses over the link's signaling stream and both
 * connect() from that same local port to the other's public address. The first SYN to arrive at the
 * far NAT is dropped (nothing went out from there yet) or crosses the far end's own SYN; either way the
 * second SYN finds both mappings open and the two SYN_SENT sockets complete one TCP connection.
 *
 * The socket is then upgraded like any libp2p connection (pnet if on, noise, yamux), with the link's
 * initiator as the noise initiator (libp2p's `initiator: false` dial option makes the other end the
 * responder on an outbound socket): the path is bound to the two PeerIds exactly like a dialled one,
 * and every stream on it still passes the member gate.
 */
import type { Connection } from '@libp2p/interface'
import { type Multiaddr, multiaddr } from '@multiformats/multiaddr'
import type { Libp2p } from 'libp2p'
import { onAbort } from '../../../src/base/abort.ts'
import { AbortError, describeError } from '../../../src/base/errors.ts'
import type { Logger } from '../../../src/base/log.ts'
import { probeTcpMapping, type TransportAddress } from '../../stun/client.ts'
import { DirectPathError } from './channels.ts'

export interface PunchPlan {
  /** The local port to punch from (the probe's). */
  readonly localPort: number
  /** The public address the NAT gives it. */
  readonly mapped: TransportAddress
}

export type PunchPrep =
  | { readonly ok: true; readonly plan: PunchPlan }
  | { readonly ok: false; readonly why: string }

/** How long one connect() may wait for the far SYN before it is retried from the same port (the
 *  kernel itself resends a SYN after 1 s). */
const ATTEMPT_MS = 3000
/** Pause before retrying a connect() that was refused or reset (a NAT that answers with RST). */
const RETRY_PAUSE_MS = 100

/**
 * Probes the STUN servers in turn (over TCP) until one answers: the NAT kept the local port → a plan;
 * it changed it → no plan (symmetric or port-rewriting NAT).
 */
export async function preparePunch(
  stunServers: readonly TransportAddress[],
  signal: AbortSignal,
  timeoutMs: number,
): Promise<PunchPrep> {
  if (stunServers.length === 0) return { ok: false, why: 'no STUN server to learn the TCP mapping from' }
  let last = 'no answer'
  for (const server of stunServers) {
    try {
      const m = await probeTcpMapping({
        server,
        signal: AbortSignal.any([signal, AbortSignal.timeout(timeoutMs)]),
      })
      if (m.mapped.port !== m.local.port)
        return {
          ok: false,
          why: `the NAT maps TCP port ${m.local.port} to ${m.mapped.port}: mappings are not predictable`,
        }
      return { ok: true, plan: { localPort: m.local.port, mapped: m.mapped } }
    } catch (err) {
      if (signal.aborted) throw err
      last = `${server.address}:${server.port}: ${describeError(err)}`
    }
  }
  return { ok: false, why: `TCP STUN failed (${last})` }
}

/** "198.51.100.10:40001" ⇄ TransportAddress (IPv4 only). */
export function formatAddr(a: TransportAddress): string {
  return `${a.address}:${a.port}`
}

const ADDR_RE = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3}):(\d{1,5})$/

export function parseAddr(text: string): TransportAddress | undefined {
  const m = ADDR_RE.exec(text)
  if (m === null) return undefined
  const octets = m.slice(1, 5).map(Number)
  const port = Number(m[5])
  if (octets.some((o) => o > 255) || port < 1 || port > 65535) return undefined
  return { address: octets.join('.'), port }
}

interface DialOptions {
  signal: AbortSignal
  localPort: number
  initiator: boolean
}
interface Upgrader {
  upgradeOutbound(maConn: { direction: string }, options: DialOptions): Promise<Connection>
}
interface WithTransports {
  components?: {
    upgrader?: Upgrader
    transportManager?: {
      dialTransportForMultiaddr(
        ma: Multiaddr,
      ): { dial(ma: Multiaddr, o: DialOptions & { upgrader: Upgrader }): Promise<Connection> } | undefined
    }
  }
}

/**
 * Dials with libp2p's own TCP transport and upgrader, but below its dial queue, which keeps only its
 * own options: the transport hands `localPort` to net.connect() (punch from the probed port) and
 * `initiator` to the upgrader (false: this outbound socket is the noise and multistream responder).
 * yamux takes its role from the socket's direction, so the responder's socket is marked inbound before
 * the upgrade (else both ends are yamux clients and their stream ids collide). The upgraded connection
 * is announced to the connection manager like any other. Internals, reached through a cast: libp2p has
 * no public API for any of this.
 */
function transportDial(node: Libp2p, ma: Multiaddr, options: DialOptions): Promise<Connection> {
  const c = (node as unknown as WithTransports).components
  const transport = c?.transportManager?.dialTransportForMultiaddr(ma)
  const upgrader = c?.upgrader
  if (transport === undefined || upgrader === undefined)
    return Promise.reject(new DirectPathError('this libp2p has no TCP transport to punch with'))
  const wrapped: Upgrader = Object.create(upgrader)
  wrapped.upgradeOutbound = (maConn, o) => {
    if (!options.initiator) maConn.direction = 'inbound'
    return upgrader.upgradeOutbound(maConn, o)
  }
  return transport.dial(ma, { ...options, upgrader: wrapped })
}

/**
 * Connects from `localPort` to the peer's public address until the simultaneous open succeeds or
 * `signal` fires; returns the upgraded libp2p connection.
 */
export async function punchTcp(init: {
  node: Libp2p
  peer: string
  localPort: number
  remote: TransportAddress
  /** The noise initiator (the link's initiator); the other end is the responder. */
  initiator: boolean
  signal: AbortSignal
  log?: Logger
}): Promise<Connection> {
  const { node, signal } = init
  const target = multiaddr(`/ip4/${init.remote.address}/tcp/${init.remote.port}/p2p/${init.peer}`)
  let attempts = 0
  for (;;) {
    if (signal.aborted) throw new AbortError('TCP punch abandoned', { cause: signal.reason })
    attempts++
    try {
      // The dial's signal reaches net.connect(), which destroys the socket whenever it fires, even
      // long after the connection is up: a signal of its own, detached once the dial settled.
      const attempt = new AbortController()
      const offAbort = onAbort(signal, (reason) => attempt.abort(reason))
      const timer = setTimeout(() => attempt.abort(new DirectPathError('no SYN from the peer')), ATTEMPT_MS)
      let conn: Connection
      try {
        conn = await transportDial(node, target, {
          signal: attempt.signal,
          localPort: init.localPort,
          initiator: init.initiator,
        })
      } finally {
        clearTimeout(timer)
        offAbort()
      }
      if (!conn.direct || conn.limits !== undefined)
        throw new DirectPathError(`punched dial to ${init.peer} returned a relayed connection`)
      init.log?.info(
        `TCP punch to ${formatAddr(init.remote)} from :${init.localPort} up after ${attempts} attempt(s)`,
      )
      return conn
    } catch (err) {
      // Refused (a NAT that answers with RST), timed out (our SYN was dropped and the far one never
      // came), or the upgrade failed: again from the same port until the caller's deadline.
      if (signal.aborted)
        throw new DirectPathError(`TCP punch to ${formatAddr(init.remote)} failed: ${describeError(err)}`, {
          cause: err,
        })
      await new Promise((r) => setTimeout(r, RETRY_PAUSE_MS))
    }
  }
}
