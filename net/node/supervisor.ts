/**
 * The link supervisor: data-plane links between members, built over a noise-authenticated signaling
 * stream, wrapped so their bulk channels can move to a direct path, rebuilt with capped backoff when
 * they die. Not every pair keeps a link: each member keeps its `warmLinks` ring neighbours (members
 * sorted by PeerId, half on each side; both ends compute the same pairs, and the lower PeerId
 * initiates, so the two ends never both offer) and builds a link to anyone else on demand
 * (Overlay.connect: the end that needs it initiates; on a collision the lower PeerId's attempt wins),
 * closing it after `linkIdleMs` without traffic or demand. A mesh of at most warmLinks + 1 members is a
 * full mesh. Its tick also moves members
 * between up / down / dropped, measures RTT where the link does not, keeps relay reservations on every
 * bootstrap, and now and then runs a full member-set exchange with one member (anti-entropy).
 *
 * Why one file of ~720 lines (#18: files over ~600 lines say why): createLinkSupervisor is one closure
 * over one map of per-member state (link, attempt in flight, backoff, wanted-until, RTT) that the link
 * attempts, the on-demand connect and the tick all read and change; split apart they would pass that
 * map around and the rules (who initiates, when to retry, when a link is idle) would no longer read in
 * one place. The parts with a life of their own are apart already: the ring (ring.ts), the direct paths
 * (net/link/direct/), the link itself (net/webrtc/).
 */
import type { Connection, PeerId, Stream } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'
import { onAbort, sleep } from '../../src/base/abort.ts'
import { AbortError, describeError } from '../../src/base/errors.ts'
import { ControlError, ControlTimeoutError } from '../control/errors.ts'
import type { IceServer, LinkFactory, MemberState } from '../interfaces.ts'
import { createPathLink } from '../link/direct/link.ts'
import type { DirectInbox, DirectPaths } from '../link/direct/paths.ts'
import { CHANNEL_NAMES, type Link, type Overlay } from '../link/interfaces.ts'
import { NotMemberError } from '../membership/errors.ts'
import {
  createStreamSignaling,
  SIGNAL_PROTOCOL,
  type StreamSignaling,
} from '../signaling/stream-signaling.ts'
import { NodeStateError } from './errors.ts'
import type { LinkSupervisor, NodeContext, PeerStatus } from './interfaces.ts'
import { listenAfterStart } from './libp2p.ts'
import { ringNeighbours } from './ring.ts'

/** Opening the signaling stream of one link attempt (dial, relay included). */
const SIGNAL_DIAL_MS = 15_000
/** A link that lived this long is rebuilt at once when it dies; one that keeps dying backs off. */
const STABLE_LINK_MS = 10_000
/** A failed relay reservation is retried after this long. */
const RESERVATION_RETRY_MS = 10_000
/**
 * Connecting to a bootstrap (before its relay reservation, and at start). libp2p's reservation gave its
 * own connection 5 s, and in a 50-agent join on 2 cores 37 of 50 first dials to the bootstrap failed
 * (each a half-done handshake thrown away; the member stayed unreachable until a retry got through).
 * libp2p still cuts each address's dial at 6 s (connectionManager.addressDialTimeout), so a dial cut so
 * is made again at once while this time is left (connectBootstrap).
 */
const BOOTSTRAP_DIAL_MS = 30_000
/** A bootstrap dial that failed fast (refused, reset) is made again after this long at first, doubling. */
const BOOTSTRAP_REDIAL_MIN_MS = 250
/** Ticks between libp2p pings of a warm or wanted member whose link does not measure RTT itself. */
const PING_EVERY_TICKS = 5
/** The same for a connected member outside the warm set (an idle agent's CPU went to such pings: each
 *  is a new yamux stream, a multistream-select negotiation and a peer-store write at both ends). */
const IDLE_PING_EVERY_TICKS = 60
/** Ticks between checks of this node's relay reservations (each reads libp2p's listen addresses, which
 *  expands 0.0.0.0 over the host's interfaces). */
const RESERVATIONS_EVERY_TICKS = 5
/** Ticks between anti-entropy exchanges. */
const ANTI_ENTROPY_EVERY_TICKS = 30
/** Ring neighbours each member keeps a link to (see the header); meshes up to this + 1 are full. */
export const DEFAULT_WARM_LINKS = 8
/** An on-demand link with no message received and no demand for this long is closed. */
export const DEFAULT_LINK_IDLE_MS = 120_000
/** How long Overlay.connect waits for a link by default (the WebRTC link gives up after 30 s). */
const CONNECT_TIMEOUT_MS = 35_000

type RttLink = Link & { readonly rttMs?: number }

interface PeerState {
  /** The parsed PeerId (parsed once: the tick asks libp2p about every member every second). */
  id: PeerId
  state: MemberState
  lastSeen: number
  link?: RttLink
  signaling?: StreamSignaling
  connecting?: AbortController
  backoffMs: number
  nextAttemptAt: number
  linkOpenedAt?: number
  rttMs?: number
  /** Unix ms until which a caller of connect() wants the link (0: never asked). */
  wantedUntil: number
  /** Unix ms of the last tick that saw a message received on the link (any channel). */
  lastActivity: number
  /** Messages received on the current link (a counter: cheaper than a clock read per message). */
  received: number
  /** `received` at the last tick. */
  receivedSeen: number
  /** This end built the current link (only that end closes it when idle: two members with different
   *  warm-set sizes would otherwise close and rebuild each other's links forever). */
  initiated: boolean
  /** The last attempt failed with the relay's NO_RESERVATION: the next one waits for a connection. */
  awaitingReservation: boolean
}

/** The relay refused a circuit dial because the member dialled holds no reservation on it. */
function isNoReservation(err: unknown, depth = 0): boolean {
  if (!(err instanceof Error) || depth > 4) return false
  if (err.message.includes('NO_RESERVATION')) return true
  const inner = err instanceof AggregateError ? err.errors : []
  return inner.some((e) => isNoReservation(e, depth + 1)) || isNoReservation(err.cause, depth + 1)
}

class NodeOverlay implements Overlay {
  private readonly linksByPeer = new Map<string, Link>()
  private readonly listeners = new Set<(link: Link) => void>()
  constructor(
    private readonly selfId: () => string,
    readonly connect: (peer: string, options?: { signal?: AbortSignal; timeoutMs?: number }) => Promise<Link>,
  ) {}
  get self(): string {
    return this.selfId()
  }
  link(peer: string): Link | undefined {
    return this.linksByPeer.get(peer)
  }
  links(): Link[] {
    return [...this.linksByPeer.values()]
  }
  onLink(handler: (link: Link) => void): () => void {
    this.listeners.add(handler)
    return () => this.listeners.delete(handler)
  }
  attach(link: Link): void {
    this.linksByPeer.set(link.peer, link)
    for (const h of [...this.listeners]) {
      try {
        h(link)
      } catch {
        // A subscriber's bug must not break link supervision.
      }
    }
  }
  detach(link: Link): void {
    if (this.linksByPeer.get(link.peer) === link) this.linksByPeer.delete(link.peer)
  }
}

export interface LinkSupervisorInit {
  ctx: NodeContext
  linkFactory: LinkFactory
  iceServers: readonly IceServer[]
  direct: DirectPaths
  /** Addresses a member advertised (gossip). */
  hints(peer: string): readonly string[]
  /** True once this node was revoked: supervision stops. */
  selfRevoked(): boolean
  /** This node is a relay (it keeps no reservations of its own). */
  relay: boolean
  /** libp2p ping of a member (records the RTT). */
  ping(peer: string): Promise<number>
  /** One full member-set exchange with `peer` (anti-entropy). */
  antiEntropy(peer: string): Promise<void>
  /** Ring neighbours kept linked (default DEFAULT_WARM_LINKS). */
  warmLinks?: number
  /** On-demand links close after this long without traffic or demand (default DEFAULT_LINK_IDLE_MS). */
  linkIdleMs?: number
}

export function createLinkSupervisor(init: LinkSupervisorInit): LinkSupervisor {
  const { ctx } = init
  const state = ctx.state
  const warmLinks = Math.max(0, Math.floor(init.warmLinks ?? DEFAULT_WARM_LINKS))
  const idleMs = init.linkIdleMs ?? DEFAULT_LINK_IDLE_MS
  const overlay = new NodeOverlay(
    () => ctx.self,
    (peer, options) => connect(peer, options),
  )
  const peers = new Map<string, PeerState>()
  const reservationAt = new Map<string, number>()
  /** Bootstraps a reservation attempt is under way on (it may take up to BOOTSTRAP_DIAL_MS and more). */
  const reserving = new Set<string>()
  let tickTimer: NodeJS.Timeout | undefined
  let ticks = 0

  const peerState = (peer: string): PeerState => {
    let st = peers.get(peer)
    if (st === undefined) {
      const now = Date.now()
      st = {
        id: peerIdFromString(peer),
        state: 'down',
        lastSeen: now,
        backoffMs: 0,
        nextAttemptAt: 0,
        wantedUntil: 0,
        lastActivity: now,
        received: 0,
        receivedSeen: 0,
        initiated: false,
        awaitingReservation: false,
      }
      peers.set(peer, st)
    }
    return st
  }

  /** The lower PeerId initiates each warm pair's link, so two ends never both offer (glare). */
  const isInitiator = (peer: string): boolean => ctx.self < peer

  /** The warm set: this node's ring neighbours among the members sorted by PeerId (cached per member
   *  list; both ends of a pair compute the same answer from the same member set). */
  let ringOf = ''
  let warm = new Set<string>()
  const warmSet = (): Set<string> => {
    const ids = (state.set?.members() ?? []).map((m) => m.peerId).sort()
    const key = ids.join(',')
    if (key === ringOf) return warm
    ringOf = key
    warm = ringNeighbours(ids, ctx.self, warmLinks)
    return warm
  }

  /** Moves a member between up / down / dropped (and emits the change). Called on every tick and at
   *  once when a link or connection to it opens or closes. */
  const observe = (peer: string, st: PeerState, now = Date.now()): void => {
    const node = ctx.libp2p
    if (node === undefined || !state.isMember(peer)) return
    const up = st.link?.state === 'open' || node.getConnections(st.id).length > 0
    // The warm set as of the last tick (recomputing it per member would cost O(n log n) each).
    const kept = warm.has(peer) || st.wantedUntil > now || st.connecting !== undefined
    if (!up && !kept) {
      // Outside the warm set and not wanted: nothing to watch here (its ring neighbours do).
      if (st.state !== 'idle') st.state = 'idle'
      return
    }
    if (up) {
      st.lastSeen = now
      if (st.state !== 'up') {
        st.state = 'up'
        ctx.emit('member-up', { peer })
      }
    } else if (st.state === 'idle') {
      // Wanted again: the grace period counts from now.
      st.lastSeen = now
      st.state = 'down'
    } else if (st.state === 'up') {
      st.state = 'down'
      ctx.emit('member-down', { peer })
    } else if (st.state === 'down' && now - st.lastSeen > ctx.timing.memberGraceMs) {
      st.state = 'dropped'
      ctx.log.info(`member ${peer} gone for ${Math.round((now - st.lastSeen) / 1000)} s: dropped`)
      ctx.emit('member-dropped', { peer })
    }
  }

  const circuitAddrs = (peer: string): string[] =>
    state.bootstrap
      .filter((b) => !b.endsWith(`/p2p/${peer}`) && !b.endsWith(`/p2p/${ctx.self}`))
      .map((b) => `${b}/p2p-circuit/p2p/${peer}`)

  /** Teaches the peer store how to reach a member: its own address hints, then every bootstrap's relay. */
  const addDialAddrs = async (peer: string): Promise<void> => {
    const node = ctx.libp2p
    if (node === undefined) return
    const id = peerIdFromString(peer)
    if (node.getConnections(id).length === 0) {
      const hinted = init.hints(peer).filter((a) => !a.includes('/p2p-circuit'))
      const addrs = [...hinted, ...circuitAddrs(peer)]
      const parsed = []
      for (const a of addrs) {
        try {
          parsed.push(multiaddr(a))
        } catch {
          // a bad hint is just skipped
        }
      }
      if (parsed.length > 0) await node.peerStore.merge(id, { multiaddrs: parsed })
    }
  }

  const dialMember = async (peer: string, protocol: string, signal: AbortSignal): Promise<Stream> => {
    const node = ctx.libp2p
    if (node === undefined) throw new NodeStateError('not started')
    await addDialAddrs(peer)
    return node.dialProtocol(peerIdFromString(peer), protocol, { signal, runOnLimitedConnection: true })
  }

  const scheduleRetry = (st: PeerState, why: string): void => {
    st.backoffMs = Math.min(Math.max(250, st.backoffMs * 2), ctx.timing.reconnectMaxMs)
    st.nextAttemptAt = Date.now() + st.backoffMs
    ctx.log.info(`${why}; retry in ${st.backoffMs} ms`)
  }

  /**
   * After the relay's NO_RESERVATION (admission gossip announces a joiner before its node has reserved;
   * a member whose relay connection died): the next attempt when a connection to the member opens —
   * once its reservation is up it connects to the warm neighbours that initiate its links
   * (announceReachable) — or after timing.reservationWaitMs. Timed retries every 0.25-3 s made ~1,200
   * of a 50-agent join's failed link attempts, each a stream through the one busy relay.
   */
  const awaitReservation = (peer: string, st: PeerState, err: unknown): void => {
    const connected = (ctx.libp2p?.getConnections(st.id).length ?? 0) > 0
    st.awaitingReservation = !connected
    // An on-demand link someone waits for keeps the short backoff: that member does not know it is
    // wanted, so no connection from it will come.
    if (!connected && st.wantedUntil > Date.now() && !warm.has(peer)) {
      scheduleRetry(st, `link attempt to ${peer} failed: ${describeError(err)}`)
      return
    }
    const waitMs = ctx.timing.reservationWaitMs
    st.nextAttemptAt = connected ? 0 : Date.now() + waitMs
    ctx.log.info(
      `link attempt to ${peer} failed: ${describeError(err)}; ${connected ? 'connected meanwhile: retry now' : `retry when it connects, at the latest in ${waitMs} ms`}`,
    )
  }

  /** A dial's signal: `ms` at most, and never past the node's lifetime (a stopping node drops it). */
  const dialSignal = (ms: number): AbortSignal =>
    ctx.lifetime === undefined
      ? AbortSignal.timeout(ms)
      : AbortSignal.any([ctx.lifetime, AbortSignal.timeout(ms)])

  /**
   * Connects to a bootstrap within BOOTSTRAP_DIAL_MS. libp2p gives each address 6 s (addressDialTimeout),
   * and in a 50-agent join on 2 cores 34-37 of 50 first dials to the bootstrap were cut so: the member
   * then waited RESERVATION_RETRY_MS (10 s) for its reservation, unreachable meanwhile. A cut dial is
   * made again at once; one that failed fast after a short, doubling pause. A longer limit for every
   * address would let one blackholed address hint use up a link's whole signaling dial.
   */
  const connectBootstrap = async (node: NonNullable<typeof ctx.libp2p>, addr: string): Promise<void> => {
    const signal = dialSignal(BOOTSTRAP_DIAL_MS)
    let pauseMs = BOOTSTRAP_REDIAL_MIN_MS
    for (let attempt = 1; ; attempt++) {
      const started = Date.now()
      try {
        await node.dial(multiaddr(addr), { signal })
        if (attempt > 1) ctx.log.info(`bootstrap ${addr} connected at dial ${attempt}`)
        return
      } catch (err) {
        if (signal.aborted) throw err
        ctx.log.info(`bootstrap dial ${attempt} to ${addr} failed: ${describeError(err)}; dialling again`)
        // A dial that used most of libp2p's per-address limit was cut by it: no pause.
        if (Date.now() - started < 3000) {
          await sleep(pauseMs, signal).catch(() => {
            throw err
          })
          pauseMs = Math.min(pauseMs * 2, 4000)
        }
      }
    }
  }

  /** A child of the node's lifetime for one link attempt; `release` unhooks it from the parent. */
  const attemptController = ():
    | { ctl: AbortController; parent: AbortSignal; release(): void }
    | undefined => {
    const parent = ctx.lifetime
    if (parent === undefined) return undefined
    const ctl = new AbortController()
    return { ctl, parent, release: onAbort(parent, (reason) => ctl.abort(reason)) }
  }

  /**
   * Bounds a pending link attempt: aborts `ctl` after linkAttemptTimeoutMs, or as soon as the signaling
   * stream dies before the link is up (its libp2p connection closed): waiting for an answer that can no
   * longer arrive would stall the pair for the whole timeout. Call the returned function when the
   * attempt settles. The link factory's signal bounds the link's whole life, which is why these limits
   * are not simply AbortSignal.timeout() in that signal: they must stop applying once the link is up.
   */
  const boundAttempt = (ctl: AbortController, signaling: StreamSignaling): (() => void) => {
    const timer = setTimeout(
      () => ctl.abort(new ControlTimeoutError(`link attempt (${ctx.timing.linkAttemptTimeoutMs} ms)`)),
      ctx.timing.linkAttemptTimeoutMs,
    )
    const offEnd = signaling.onEnd((err) => ctl.abort(err))
    return () => {
      clearTimeout(timer)
      offEnd()
    }
  }

  const attachLink = (
    peer: string,
    rawLink: RttLink,
    signaling: StreamSignaling,
    inbox: DirectInbox,
    initiator: boolean,
  ): void => {
    // Every link is a PathLink: its bulk channels may move to a direct connection once it is up.
    const link = createPathLink(rawLink)
    const st = peers.get(peer)
    if (ctx.libp2p === undefined || st === undefined || !state.isMember(peer) || link.state === 'closed') {
      link.close(new NotMemberError(peer))
      inbox.close()
      signaling.close()
      return
    }
    if (st.link !== undefined && st.link !== link) st.link.close(new ControlError('replaced by a new link'))
    st.link = link
    st.signaling = signaling
    st.linkOpenedAt = Date.now()
    st.lastActivity = st.linkOpenedAt
    st.initiated = initiator
    // Passive listeners (channels deliver to every listener): traffic keeps an on-demand link open.
    const offs = CHANNEL_NAMES.map((n) =>
      link.channel(n).onMessage(() => {
        st.received++
      }),
    )
    link.onClose(() => {
      for (const off of offs) off()
    })
    overlay.attach(link)
    ctx.log.debug(`link to ${peer} up (${link.path.type})`)
    ctx.emit('link-up', { peer, path: link.path.type })
    observe(peer, st)
    link.onClose((reason) => {
      overlay.detach(link)
      signaling.close()
      if (st.link !== link) return
      st.link = undefined
      st.signaling = undefined
      const lived = Date.now() - (st.linkOpenedAt ?? 0)
      ctx.emit('link-down', { peer, ...(reason === undefined ? {} : { reason: describeError(reason) }) })
      observe(peer, st)
      if (lived > STABLE_LINK_MS) st.backoffMs = 0
      st.nextAttemptAt = st.backoffMs === 0 ? 0 : Date.now() + st.backoffMs
      ctx.log.debug(`link to ${peer} down: ${reason === undefined ? 'closed' : describeError(reason)}`)
    })
    // In the background: the link is already usable; its bulk channels move if a direct path exists.
    const upgrade = new AbortController()
    link.onClose(() => upgrade.abort(new ControlError('link closed')))
    void init.direct.negotiate(link, { signaling, inbox, initiator, signal: upgrade.signal }).then(() => {
      if (link.path.direct !== undefined && link.state === 'open')
        ctx.emit('link-direct', { peer, remote: link.path.direct })
    })
  }

  /**
   * One link attempt over an open signaling stream, from either end: the link factory, bounded by
   * boundAttempt, then attachLink. On failure the signaling stream is closed and the error rethrown.
   */
  const buildLink = async (
    peer: string,
    stream: Stream,
    initiator: boolean,
    ctl: AbortController,
  ): Promise<void> => {
    const signaling = createStreamSignaling(stream, { log: ctx.log })
    // Subscribed now: the peer's direct-path offer may come as soon as its end of the link is up.
    const inbox = init.direct.inbox(signaling)
    const settle = boundAttempt(ctl, signaling)
    try {
      let link: RttLink
      try {
        link = await init.linkFactory({
          peer,
          initiator,
          signaling,
          iceServers: [...init.iceServers],
          signal: ctl.signal,
        })
      } finally {
        settle()
      }
      attachLink(peer, link, signaling, inbox, initiator)
    } catch (err) {
      inbox.close()
      signaling.close()
      throw err
    }
  }

  const startLinkAttempt = (peer: string, st: PeerState): void => {
    const a = attemptController()
    if (a === undefined) return
    const { ctl, parent } = a
    st.connecting = ctl
    st.awaitingReservation = false
    const run = async () => {
      try {
        const stream = await dialMember(
          peer,
          SIGNAL_PROTOCOL,
          AbortSignal.any([ctl.signal, AbortSignal.timeout(SIGNAL_DIAL_MS)]),
        )
        await buildLink(peer, stream, true, ctl)
      } catch (err) {
        // Stopped, revoked, or superseded by the peer's own attempt: no retry from here.
        if (parent.aborted || st.connecting !== ctl || peers.get(peer) !== st) return
        if (isNoReservation(err)) awaitReservation(peer, st, err)
        else scheduleRetry(st, `link attempt to ${peer} failed: ${describeError(err)}`)
      } finally {
        a.release()
        if (st.connecting === ctl) st.connecting = undefined
      }
    }
    void run()
  }

  /** Starts a link attempt when this end should have a link to `peer` (a warm neighbour it initiates
   *  for, or one wanted now) and has none, none is under way, and no retry is pending. */
  const attemptIfDue = (peer: string, st: PeerState, now: number, isWarm: boolean): void => {
    if (
      st.state !== 'dropped' &&
      ((isWarm && isInitiator(peer)) || st.wantedUntil > now) &&
      st.link === undefined &&
      st.connecting === undefined &&
      now >= st.nextAttemptAt
    ) {
      st.nextAttemptAt = now + ctx.timing.reconnectMaxMs
      startLinkAttempt(peer, st)
    }
  }

  /**
   * Called when this node's relay reservation is up: connects to the warm neighbours that initiate
   * its links (lower PeerIds) and have no connection to it yet. Their attempts may have met the
   * relay's NO_RESERVATION (admission gossip announced this member before it had reserved); the
   * connection tells them to try again now, and their signaling stream rides it.
   */
  const announceReachable = (): void => {
    const node = ctx.libp2p
    if (node === undefined || ctx.lifetime === undefined) return
    for (const peer of warmSet()) {
      if (isInitiator(peer) || !state.isMember(peer)) continue
      const st = peers.get(peer)
      if (st === undefined || st.link !== undefined || node.getConnections(st.id).length > 0) continue
      void (async () => {
        await addDialAddrs(peer)
        await node.dial(st.id, { signal: dialSignal(SIGNAL_DIAL_MS) })
      })().catch((err) =>
        ctx.log.debug(`telling ${peer} this member is reachable failed: ${describeError(err)}`),
      )
    }
  }

  /** The open link to `peer`, built now if there is none (on demand: this end initiates). */
  const connect = async (
    peer: string,
    options: { signal?: AbortSignal; timeoutMs?: number } = {},
  ): Promise<Link> => {
    const now = Date.now()
    const existing = overlay.link(peer)
    const st = peers.get(peer)
    if (st !== undefined) st.wantedUntil = now + idleMs
    if (existing !== undefined && existing.state === 'open') return existing
    if (peer === ctx.self) throw new ControlError('no link to oneself')
    if (ctx.libp2p === undefined) throw new NodeStateError('not started')
    if (!state.isMember(peer)) throw new NotMemberError(peer)
    // A warm member's link is kept by the tick: when it is down, the supervisor is already rebuilding
    // it, and callers get the answer they always got (no link now) instead of a wait.
    if (warm.has(peer)) throw new ControlError(`no open link to ${peer} (it is being rebuilt)`)
    const s = peerState(peer)
    s.wantedUntil = now + idleMs
    if (s.link === undefined && s.connecting === undefined) {
      s.nextAttemptAt = now + ctx.timing.reconnectMaxMs
      startLinkAttempt(peer, s)
    }
    const timeoutMs = options.timeoutMs ?? CONNECT_TIMEOUT_MS
    return new Promise<Link>((resolve, reject) => {
      const cleanup = () => {
        off()
        clearTimeout(timer)
        offAbort()
      }
      const off = overlay.onLink((l) => {
        if (l.peer !== peer) return
        cleanup()
        resolve(l)
      })
      const timer = setTimeout(() => {
        cleanup()
        reject(new ControlTimeoutError(`link to ${peer} (${timeoutMs} ms)`))
      }, timeoutMs)
      const offAbort = onAbort(options.signal, (reason) => {
        cleanup()
        reject(new AbortError(undefined, { cause: reason }))
      })
    })
  }

  /** Keeps a circuit-relay reservation on every bootstrap, so members behind NAT can be dialled. */
  const keepReservations = (now: number): void => {
    const node = ctx.libp2p
    if (node === undefined) return
    const mine = ctx.addresses()
    for (const b of state.bootstrap) {
      const relayId = b.split('/p2p/').pop()
      if (relayId === undefined || relayId === ctx.self || !state.isMember(relayId)) continue
      if (mine.some((a) => a.includes(`/p2p/${relayId}/p2p-circuit`))) continue
      if (reserving.has(b) || now < (reservationAt.get(b) ?? 0)) continue
      reserving.add(b)
      // Connected first, with time enough under load: libp2p's reservation then reuses the connection.
      const reserve = async () => {
        if (node.getConnections(peerIdFromString(relayId)).length === 0) await connectBootstrap(node, b)
        const listening = listenAfterStart(node, [`${b}/p2p-circuit`])
        if (listening !== false) await listening
      }
      void reserve()
        .finally(() => {
          reserving.delete(b)
          reservationAt.set(b, Date.now() + RESERVATION_RETRY_MS)
        })
        .then(announceReachable, (err) => {
          // libp2p's first line only says that a listen address failed; the cause follows the address.
          const cause =
            err instanceof Error
              ? err.message
                  .split('\n')
                  .find((l) => l.includes('/p2p-circuit: '))
                  ?.split('/p2p-circuit: ')[1]
              : undefined
          ctx.log.warn(`relay reservation on ${b} failed: ${describeError(err)}${cause ? ` (${cause})` : ''}`)
        })
    }
  }

  /**
   * Aborts connections whose muxer closed while the connection still says 'open' (libp2p 3.3.11 keeps
   * them in its table, and every dial to that peer reuses one and fails with 'The connection muxer is
   * "closed"'). Seen in a 50-agent join: members lost their bootstrap connection this way and could
   * neither renew their relay reservation nor be reached; membership stalled at 13-21 of 50.
   */
  const reapZombies = (node: NonNullable<typeof ctx.libp2p>): void => {
    for (const c of node.getConnections()) {
      const muxer = (c as unknown as { muxer?: { status?: string } }).muxer
      if (c.status === 'open' && muxer?.status !== undefined && muxer.status !== 'open') {
        ctx.log.info(`connection to ${c.remotePeer.toString()} has a ${muxer.status} muxer: aborting it`)
        c.abort(new ControlError(`muxer ${muxer.status}`))
      }
    }
  }

  const tick = (): void => {
    const node = ctx.libp2p
    const set = state.set
    if (node === undefined || set === undefined || init.selfRevoked()) return
    ticks++
    const now = Date.now()
    const warmPeers = warmSet()
    for (const [peer, st] of peers) {
      if (!set.isMember(peer)) continue
      const conns = node.getConnections(st.id)
      observe(peer, st, now)
      const isWarm = warmPeers.has(peer)
      const wanted = st.wantedUntil > now
      attemptIfDue(peer, st, now, isWarm)
      if (st.link !== undefined && st.received !== st.receivedSeen) {
        st.receivedSeen = st.received
        st.lastActivity = now
      }
      if (
        st.link !== undefined &&
        st.initiated &&
        !isWarm &&
        !wanted &&
        now - st.lastActivity > idleMs &&
        CHANNEL_NAMES.every((n) => st.link?.channel(n).bufferedAmount === 0)
      ) {
        ctx.log.info(
          `link to ${peer} idle for ${Math.round((now - st.lastActivity) / 1000)} s (not in the warm set): closing`,
        )
        st.link.close(new ControlError('idle link outside the warm set'))
      }
      if (st.link?.rttMs !== undefined) st.rttMs = st.link.rttMs
      else if (
        conns.length > 0 &&
        ticks % (isWarm || wanted ? PING_EVERY_TICKS : IDLE_PING_EVERY_TICKS) === 0
      )
        void init.ping(peer).catch(() => {})
    }
    reapZombies(node)
    if (!init.relay && (ticks <= RESERVATIONS_EVERY_TICKS || ticks % RESERVATIONS_EVERY_TICKS === 0))
      keepReservations(now)
    // Anti-entropy: now and then a full exchange with one connected member heals any missed gossip.
    if (ticks % ANTI_ENTROPY_EVERY_TICKS === 0) {
      const conns = node.getConnections().filter((c) => set.isMember(c.remotePeer.toString()))
      const c = conns[Math.floor(Math.random() * conns.length)]
      if (c !== undefined) void init.antiEntropy(c.remotePeer.toString()).catch(() => {})
    }
  }

  return {
    overlay,
    dialMember,
    addDialAddrs,

    start() {
      tickTimer = setInterval(tick, ctx.timing.tickMs)
      tickTimer.unref?.()
      // Reserve now, not a tick later: until then members behind NAT cannot reach this one.
      if (!init.relay) keepReservations(Date.now())
    },

    stop() {
      if (tickTimer !== undefined) clearInterval(tickTimer)
      tickTimer = undefined
      for (const st of peers.values()) {
        st.connecting?.abort()
        st.link?.close()
        st.signaling?.close()
      }
      peers.clear()
    },

    trackMembers() {
      for (const m of state.set?.members() ?? []) if (m.peerId !== ctx.self) peerState(m.peerId)
    },

    dropPeers(drop, reason) {
      const out: string[] = []
      for (const [peer, st] of peers) {
        if (!drop(peer)) continue
        st.connecting?.abort()
        st.link?.close(reason(peer))
        st.signaling?.close()
        peers.delete(peer)
        out.push(peer)
      }
      return out
    },

    observe(peer) {
      const st = peers.get(peer)
      if (st === undefined) return
      observe(peer, st)
      // A member the relay had no reservation for connected (or was connected): try its link now.
      if (st.awaitingReservation && (ctx.libp2p?.getConnections(st.id).length ?? 0) > 0) {
        st.awaitingReservation = false
        st.nextAttemptAt = 0
        ctx.log.info(`${peer} connected after the relay had no reservation for it: link attempt now`)
        attemptIfDue(peer, st, Date.now(), warm.has(peer))
      }
    },

    keeps(peer) {
      if (warmSet().has(peer)) return true
      const st = peers.get(peer)
      return st !== undefined && (st.link?.state === 'open' || st.wantedUntil > Date.now())
    },

    status(peer): PeerStatus | undefined {
      const st = peers.get(peer)
      if (st === undefined) return undefined
      return {
        state: st.state,
        lastSeen: st.lastSeen,
        link: st.link,
        connecting: st.connecting !== undefined,
        rttMs: st.rttMs,
      }
    },

    setRtt(peer, rttMs) {
      const st = peers.get(peer)
      if (st !== undefined) st.rttMs = rttMs
    },

    async dialBootstrap(addr) {
      const node = ctx.libp2p
      if (node === undefined || addr.endsWith(`/p2p/${ctx.self}`)) return
      try {
        await connectBootstrap(node, addr)
      } catch (err) {
        ctx.log.warn(`bootstrap ${addr} unreachable: ${describeError(err)}`)
      }
    },

    async handleSignal(stream: Stream, conn: Connection) {
      const peer = conn.remotePeer.toString()
      const st = peerState(peer)
      if (isInitiator(peer) && st.connecting !== undefined) {
        // Both ends offered at once (the other one wants a link on demand while ours is under way):
        // the lower PeerId's attempt wins; the other end drops its own when ours reaches it.
        stream.abort(new ControlError(`${peer}: link attempts crossed (lower PeerId's attempt wins)`))
        return
      }
      // The initiator only opens a new attempt when its old link is gone: drop ours too.
      st.connecting?.abort()
      st.link?.close(new ControlError('peer started a new link'))
      const a = attemptController()
      if (a === undefined) return
      st.connecting = a.ctl
      try {
        await buildLink(peer, stream, false, a.ctl)
      } catch (err) {
        if (!a.parent.aborted) ctx.log.warn(`link from ${peer} failed: ${describeError(err)}`)
      } finally {
        a.release()
        if (st.connecting === a.ctl) st.connecting = undefined
      }
    },
  }
}
