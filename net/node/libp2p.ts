/**
 * The one libp2p configuration of the control plane: TCP + noise + yamux (+ pnet when asked), for both
 * the member's node and the short-lived dial-only node that presents an invite before this host is a
 * member. Also the two libp2p internals the node needs (reached through a cast: libp2p 3 has no public
 * API to add a listen address after start, nor to read a registered handler).
 */
import '../polyfill.ts'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { circuitRelayServer, circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { identify } from '@libp2p/identify'
import type { ConnectionGater, PrivateKey, StreamHandler } from '@libp2p/interface'
import { ping } from '@libp2p/ping'
import { preSharedKey } from '@libp2p/pnet'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p, type Libp2p } from 'libp2p'
import type { NetworkInfo } from '../membership/interfaces.ts'
import { pnetKeyOf } from '../membership/network.ts'

export const DEFAULT_LISTEN = ['/ip4/0.0.0.0/tcp/0']

interface Common {
  privateKey: PrivateKey
  network: NetworkInfo
  /** Add a pre-shared key derived from the network's public key. */
  pnet: boolean
}

/** A member's node: listens, is gated, runs identify and ping, and relays when it is a bootstrap. */
export interface MemberPlaneInit extends Common {
  kind: 'member'
  listen: readonly string[]
  announce?: readonly string[]
  gater: ConnectionGater
  /** Serve circuit-relay-v2 (hop) to members. */
  relay: boolean
}

/** Inbound connections accepted per remote IP per second (libp2p's default: 5). */
const INBOUND_PER_IP_PER_SECOND = 200
/** Inbound connections in their handshake at once (libp2p's default: 10). */
const MAX_PENDING_INBOUND = 128

/** How long making a relay reservation may take (libp2p's default: 5 s). */
const RESERVATION_TIMEOUT_MS = 30_000

/**
 * Streams the remote may open on a new connection before libp2p has wired it up here (libp2p's
 * default: 10; one more aborts the whole connection with MaxEarlyStreamsError, at both ends a "closed
 * muxer"). In a 50-agent join a member that reached the loaded bootstrap late opened at once a relayed
 * dial for each waiting link attempt, its member sync and its reservation: the bootstrap aborted
 * every such connection, and the member stayed cut off for up to ~100 s. No weaker admission: an early
 * stream meets the member gate like any other, and a wired-up connection takes up to 1,000 streams.
 */
const MAX_EARLY_STREAMS = 256

/** The control plane's stream muxer (yamux). */
export function controlMuxer(): ReturnType<typeof yamux> {
  return yamux({ maxEarlyStreams: MAX_EARLY_STREAMS })
}

/** A dial-only node for admission: no listener, no services. Started at once. */
export interface JoinerPlaneInit extends Common {
  kind: 'joiner'
}

export async function createControlPlane(init: MemberPlaneInit | JoinerPlaneInit): Promise<Libp2p> {
  const common = {
    privateKey: init.privateKey,
    connectionEncrypters: [noise()],
    streamMuxers: [controlMuxer()],
    ...(init.pnet ? { connectionProtector: preSharedKey({ psk: pnetKeyOf(init.network) }) } : {}),
  }
  if (init.kind === 'joiner')
    return createLibp2p({ ...common, addresses: { listen: [] }, transports: [tcp()] })
  return createLibp2p({
    ...common,
    // Not yet: handlers and the member checks must be in place before the first connection.
    start: false,
    addresses: {
      listen: [...init.listen],
      ...(init.announce === undefined ? {} : { announce: [...init.announce] }),
    },
    // A reservation's own time limit (default 5 s) ran out under a 50-agent join on 2 cores (113
    // failures in one run); a member without one cannot be reached through the relay at all.
    transports: [tcp(), circuitRelayTransport({ reservationCompletionTimeout: RESERVATION_TIMEOUT_MS })],
    connectionGater: init.gater,
    // libp2p's monitor pings every connection every 10 s and, by default, aborts one whose ping fails.
    // Its ping collided with our own (`mesh ping`, RTT ticks) on the ping protocol's one-stream limit
    // and then killed a healthy connection carrying direct-path streams mid-transfer. Liveness is the
    // links' heartbeat's job, RTT the supervisor's (nothing reads the monitor's connection.rtt), and
    // each of its pings is a new stream with a protocol negotiation and a peer-store write at both
    // ends: most of an idle agent's CPU with a dozen connections. Off.
    connectionMonitor: { enabled: false },
    // libp2p's defaults (5 inbound connections a second per remote IP, 10 pending) refused members
    // joining at once: the members behind one NAT share its public IP, each join opens two
    // connections (admission, then the member node), and a bootstrap takes a whole fleet's joins in a
    // burst (50 agents: ECONNRESET). The member gate still refuses strangers after the handshake.
    connectionManager: {
      inboundConnectionThreshold: INBOUND_PER_IP_PER_SECOND,
      maxIncomingPendingConnections: MAX_PENDING_INBOUND,
    },
    services: {
      identify: identify(),
      ping: ping({ maxOutboundStreams: 4, maxInboundStreams: 4 }),
      // The relay carries members' signaling and control streams, not bulk data (that goes over
      // WebRTC): no default data/duration limit, so relayed connections are not "limited".
      ...(init.relay
        ? {
            relay: circuitRelayServer({
              reservations: {
                maxReservations: 1024,
                applyDefaultLimit: false,
                reservationTtl: 30 * 60_000,
              },
            }),
          }
        : {}),
    },
  })
}

/** Internals reached through a cast (see the header). */
interface WithComponents {
  components?: {
    transportManager?: { listen(addrs: ReturnType<typeof multiaddr>[]): Promise<void> }
    registrar?: { getHandler(protocol: string): { handler: StreamHandler; options: Record<string, unknown> } }
  }
}

/** Adds listen addresses after start (a relay reservation is a `/p2p-circuit` listen address). False
 *  when this libp2p version has no transport manager to ask. */
export function listenAfterStart(node: Libp2p, addrs: string[]): Promise<void> | false {
  const tm = (node as unknown as WithComponents).components?.transportManager
  if (tm === undefined) return false
  return tm.listen(addrs.map((a) => multiaddr(a)))
}

/** The handler libp2p registered for `protocol`, if any. */
export function registeredHandler(
  node: Libp2p,
  protocol: string,
): { handler: StreamHandler; options: Record<string, unknown> } | undefined {
  const registrar = (node as unknown as WithComponents).components?.registrar
  if (registrar === undefined) return undefined
  try {
    return registrar.getHandler(protocol)
  } catch {
    return undefined // not registered
  }
}
