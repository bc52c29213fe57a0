/**
 * The mesh node: composes the parts in net/node/ (contracts in net/node/interfaces.ts) — member state
 * file, membership gate, admission, gossip, link supervisor, the libp2p control plane — and owns what
 * ties them together: the lifecycle (start/stop), the events, and the queries the agent asks.
 */
import './polyfill.ts'
import type { Connection, PeerId } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import type { Libp2p } from 'libp2p'
import { onAbort } from '../src/base/abort.ts'
import { describeError, throwIfAborted } from '../src/base/errors.ts'
import { type Logger, silentLogger } from '../src/base/log.ts'
import { ControlError } from './control/errors.ts'
import { ADMIT_PROTOCOL, MEMBERS_PROTOCOL, MEMBERS_PROTOCOL_V2 } from './control/protocols.ts'
import {
  receiveStreamBench,
  STREAM_BENCH_PROTOCOL,
  type StreamBenchResult,
  sendStreamBench,
} from './diag/stream-bench.ts'
import { type Identity, loadOrCreateIdentity } from './identity/index.ts'
import type {
  LinkFactory,
  MemberStatus,
  MeshNode,
  MeshNodeEvents,
  MeshNodeInit,
  MeshNodeTiming,
} from './interfaces.ts'
import { createDirectPaths, DIRECT_PROTOCOL, type DirectPaths } from './link/direct/paths.ts'
import { MembershipError, NotMemberError, PeerRevokedError } from './membership/errors.ts'
import { isValidName } from './membership/network.ts'
import { createAdmission } from './node/admission.ts'
import { type CongestionControl, type CongestionStatus, createCongestionControl } from './node/congestion.ts'
import { NodeStateError, NotJoinedError } from './node/errors.ts'
import { createMemberGate } from './node/gate.ts'
import { createGossip } from './node/gossip.ts'
import type {
  Admission,
  Gossip,
  GossipStats,
  LinkSupervisor,
  MemberGate,
  NodeContext,
} from './node/interfaces.ts'
import { createControlPlane, DEFAULT_LISTEN } from './node/libp2p.ts'
import { createMemberState } from './node/state.ts'
import { createLinkSupervisor } from './node/supervisor.ts'
import { SIGNAL_PROTOCOL } from './signaling/stream-signaling.ts'
import { type StunServer, startStunServer } from './stun/server.ts'
import { createWebRtcLink } from './webrtc/link.ts'

export { ADMIT_PROTOCOL, MEMBERS_PROTOCOL } from './control/protocols.ts'
export { NodeStateError, NotJoinedError } from './node/errors.ts'
export { knownBootstrap, NETWORK_STATE_FILE, readNetworkState } from './node/state.ts'
export { SIGNAL_PROTOCOL } from './signaling/stream-signaling.ts'

type Handler<T> = (detail: T) => void

const DEFAULT_TIMING: Required<MeshNodeTiming> = {
  memberGraceMs: 10 * 60_000,
  reconnectMaxMs: 3000,
  tickMs: 1000,
  admissionWindowMs: 15_000,
  requestTimeoutMs: 10_000,
  linkAttemptTimeoutMs: 45_000,
  reservationWaitMs: 5000,
}

/** Bootstraps answer STUN (UDP and TCP) on this port. */
const BOOTSTRAP_STUN_PORT = 3478

/** STUN servers for the TCP punch: the bootstraps' public IPv4 addresses. */
function stunServersOf(bootstrap: readonly string[]): { address: string; port: number }[] {
  const hosts = new Set<string>()
  for (const b of bootstrap) {
    const m = /^\/ip4\/([\d.]+)\/tcp\//.exec(b)
    if (m?.[1] !== undefined && !m[1].startsWith('127.')) hosts.add(m[1])
  }
  return [...hosts].map((address) => ({ address, port: BOOTSTRAP_STUN_PORT }))
}

/** A stream bench runs this long at most unless the caller's signal says otherwise. */
const BENCH_TIMEOUT_MS = 600_000

export function createMeshNode(init: MeshNodeInit): MeshNode {
  return new MeshNodeImpl(init)
}

class MeshNodeImpl implements MeshNode {
  private readonly timing: Required<MeshNodeTiming>
  private readonly log: Logger
  private readonly handlers = new Map<string, Set<Handler<never>>>()
  private identity: Identity | undefined
  private libp2p: Libp2p | undefined
  private ctl: AbortController | undefined
  private stun: StunServer | undefined
  /** Removes the listener that stops the node when the caller's signal aborts. */
  private offExternalAbort: () => void = () => {}
  private readonly ctx: NodeContext
  private readonly gate: MemberGate
  private readonly gossip: Gossip
  private readonly admission: Admission
  private readonly links: LinkSupervisor
  private readonly direct: DirectPaths
  private readonly tcpCc: CongestionControl

  constructor(private readonly init: MeshNodeInit) {
    if (!isValidName(init.name)) throw new MembershipError(`invalid member name '${init.name}'`)
    this.timing = { ...DEFAULT_TIMING, ...init.timing }
    this.log = init.log ?? silentLogger
    const linkFactory: LinkFactory = init.linkFactory ?? ((o) => createWebRtcLink({ ...init.webrtc, ...o }))
    const self = this
    this.ctx = {
      get self() {
        return self.peerId
      },
      get libp2p() {
        return self.libp2p
      },
      get lifetime() {
        return self.ctl?.signal
      },
      state: createMemberState({ stateDir: init.stateDir, bootstrap: init.bootstrap ?? [], log: this.log }),
      timing: this.timing,
      log: this.log,
      emit: (event, detail) => this.emit(event, detail),
      addresses: () => this.addresses(),
    }
    const ctx = this.ctx
    this.gossip = createGossip({
      ctx,
      dropPeers: (drop, reason) => this.links.dropPeers(drop, reason),
      trackMembers: () => this.links.trackMembers(),
      // Changes go to the members this node keeps links to; the ring carries them to everyone.
      pushTo: (peer) => this.links.keeps(peer),
    })
    this.gate = createMemberGate({
      ctx,
      pullSelf: (peer, signal) => this.gossip.exchange(peer, 'self', { signal }),
    })
    this.direct = createDirectPaths({
      libp2p: () => this.libp2p,
      hints: (peer) => this.gossip.hints(peer),
      enabled: init.direct !== false,
      stunServers: () => init.stunServers ?? stunServersOf(ctx.state.bootstrap),
      relay: init.relayBulk !== false,
      log: this.log,
    })
    this.tcpCc = createCongestionControl({
      ...(init.tcpCongestion === undefined ? {} : { algorithm: init.tcpCongestion }),
      log: this.log,
    })
    this.links = createLinkSupervisor({
      ctx,
      linkFactory,
      iceServers: init.iceServers ?? [],
      direct: this.direct,
      hints: (peer) => this.gossip.hints(peer),
      selfRevoked: () => this.gossip.selfRevoked,
      relay: init.bootstrapRole?.relay === true,
      ping: (peer) => this.ping(peer),
      ...(init.links?.warm === undefined ? {} : { warmLinks: init.links.warm }),
      ...(init.links?.idleMs === undefined ? {} : { linkIdleMs: init.links.idleMs }),
      antiEntropy: (peer) =>
        this.gossip.sync(peer, [], { signal: AbortSignal.timeout(this.timing.requestTimeoutMs) }),
    })
    this.admission = createAdmission({
      ctx,
      identity: () => this.loadIdentity(),
      name: init.name,
      networkKey: init.networkKey,
      pnet: init.pnet === true,
      bootstrapRelay: init.bootstrapRole?.relay === true,
      gate: this.gate,
      changed: (source, added) => this.gossip.changed(source, added),
    })
  }

  get peerId(): string {
    return this.identity?.peerId.toString() ?? ''
  }
  get overlay() {
    return this.links.overlay
  }
  get networkId(): string | undefined {
    return this.ctx.state.network?.id
  }
  get networkName(): string | undefined {
    return this.ctx.state.network?.name
  }

  on<E extends keyof MeshNodeEvents>(event: E, handler: (detail: MeshNodeEvents[E]) => void): () => void {
    let set = this.handlers.get(event)
    if (set === undefined) {
      set = new Set()
      this.handlers.set(event, set)
    }
    set.add(handler as Handler<never>)
    return () => set.delete(handler as Handler<never>)
  }

  private emit<E extends keyof MeshNodeEvents>(event: E, detail: MeshNodeEvents[E]): void {
    for (const h of [...(this.handlers.get(event) ?? [])]) {
      try {
        ;(h as Handler<MeshNodeEvents[E]>)(detail)
      } catch (err) {
        this.log.warn(`event handler for ${event} failed: ${describeError(err)}`)
      }
    }
  }

  private async loadIdentity(): Promise<Identity> {
    this.identity ??= await loadOrCreateIdentity(this.init.stateDir)
    return this.identity
  }

  // ---------------------------------------------------------------- lifecycle

  async start(): Promise<void> {
    if (this.libp2p !== undefined) return
    throwIfAborted(this.init.signal)
    const identity = await this.loadIdentity()
    const state = this.ctx.state
    await state.load()
    if (this.init.networkKey !== undefined) await this.admission.admitSelf()
    if (state.network === undefined && this.init.invite !== undefined)
      await this.admission.join(this.init.invite, this.init.signal)
    const network = state.network
    const set = state.set
    if (network === undefined || set === undefined) throw new NotJoinedError(this.init.stateDir)
    if (set.isRevoked(this.peerId)) throw new PeerRevokedError(this.peerId)
    if (!set.isMember(this.peerId)) throw new NotMemberError(this.peerId)

    this.ctl = new AbortController()
    this.offExternalAbort = onAbort(this.init.signal, () => void this.stop())
    const listen = this.init.listen ?? DEFAULT_LISTEN
    const node = await createControlPlane({
      kind: 'member',
      privateKey: identity.privateKey,
      network,
      pnet: this.init.pnet === true,
      listen,
      ...(this.init.announce === undefined ? {} : { announce: this.init.announce }),
      gater: this.gate.connectionGater(),
      relay: this.init.bootstrapRole?.relay === true,
    })
    this.libp2p = node
    await this.registerHandlers(node)
    try {
      await node.start()
      // identify and ping register their handlers when they start: wrap them right after (a stranger's
      // stream in between would still find no mesh protocol open, only these two).
      await this.gate.guardBuiltins(node, [
        ADMIT_PROTOCOL,
        MEMBERS_PROTOCOL,
        MEMBERS_PROTOCOL_V2,
        SIGNAL_PROTOCOL,
      ])
      const stunPort = this.init.bootstrapRole?.stunPort
      if (stunPort !== undefined) {
        this.stun = await startStunServer({ port: stunPort, signal: this.ctl.signal })
        this.log.info(`STUN responder up on UDP ${this.stun.port}`)
      }
    } catch (err) {
      this.libp2p = undefined
      this.ctl.abort()
      this.offExternalAbort()
      await Promise.resolve(node.stop()).catch(() => {})
      throw new ControlError(`cannot start the control plane on ${listen.join(' ')}: ${describeError(err)}`, {
        cause: err,
      })
    }
    this.links.trackMembers()
    this.log.info(`mesh node ${this.peerId} (${this.init.name}) up on ${this.addresses().join(' ')}`)
    for (const b of state.bootstrap) void this.links.dialBootstrap(b)
    this.links.start()
  }

  private async registerHandlers(node: Libp2p): Promise<void> {
    const opts = { runOnLimitedConnection: true, maxInboundStreams: 64 }
    const { gate } = this
    await node.handle(ADMIT_PROTOCOL, (s, c) => this.admission.handle(s, c), {
      ...opts,
      maxInboundStreams: 4,
    })
    await node.handle(
      MEMBERS_PROTOCOL,
      gate.guard(MEMBERS_PROTOCOL, (s, c) => this.gossip.handle(s, c)),
      opts,
    )
    await node.handle(
      MEMBERS_PROTOCOL_V2,
      gate.guard(MEMBERS_PROTOCOL_V2, (s, c) => this.gossip.handleSync(s, c)),
      opts,
    )
    await node.handle(
      SIGNAL_PROTOCOL,
      gate.guard(SIGNAL_PROTOCOL, (s, c) => this.links.handleSignal(s, c)),
      opts,
    )
    // Direct paths exist only on direct connections: no runOnLimitedConnection.
    await node.handle(
      DIRECT_PROTOCOL,
      gate.guard(DIRECT_PROTOCOL, (s, c) => this.direct.handle(s, c)),
      { maxInboundStreams: 16 },
    )
    await node.handle(
      STREAM_BENCH_PROTOCOL,
      gate.guard(STREAM_BENCH_PROTOCOL, async (s) => receiveStreamBench(s)),
      { runOnLimitedConnection: true, maxInboundStreams: 2 },
    )
    node.addEventListener('connection:open', (evt) => {
      this.tcpCc.apply(evt.detail)
      this.onConnectionOpen(evt.detail)
    })
    node.addEventListener('connection:close', (evt) => this.links.observe(evt.detail.remotePeer.toString()))
  }

  private onConnectionOpen(conn: Connection): void {
    const peer = conn.remotePeer.toString()
    if (this.ctx.state.isMember(peer)) {
      this.links.observe(peer)
      // Digests first: a member that connects gets only what it lacks (usually nothing).
      void this.gossip
        .sync(peer, [], { signal: AbortSignal.timeout(this.timing.requestTimeoutMs) })
        .catch((err) => this.log.warn(`member sync with ${peer} failed: ${describeError(err)}`))
      return
    }
    // A stranger may connect to present an invite; it gets a bounded window to do so.
    this.gate.admissionWindow(conn)
  }

  async stop(): Promise<void> {
    const node = this.libp2p
    if (node === undefined) return
    this.libp2p = undefined
    this.offExternalAbort()
    this.ctl?.abort(new NodeStateError('node stopped'))
    this.links.stop()
    this.direct.stop()
    await this.stun?.close()
    this.stun = undefined
    await this.ctx.state.settled()
    await node.stop()
  }

  addresses(): string[] {
    return this.libp2p?.getMultiaddrs().map((a) => a.toString()) ?? []
  }

  congestion(): CongestionStatus {
    return this.tcpCc.status()
  }

  gossipStats(): GossipStats {
    return this.gossip.stats()
  }

  // ---------------------------------------------------------------- membership

  async join(invite: string, options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this.libp2p !== undefined) throw new NodeStateError('join() needs a stopped node')
    await this.admission.join(invite, options.signal)
  }

  invite(options: { ttlMs: number; bind?: string; bootstrap?: string[] }): Promise<string> {
    return this.admission.invite(options)
  }

  revoke(peer: string): Promise<void> {
    return this.admission.revoke(peer)
  }

  // ---------------------------------------------------------------- queries

  members(options: { includeDropped?: boolean } = {}): MemberStatus[] {
    const set = this.ctx.state.set
    if (set === undefined) return []
    const node = this.libp2p
    const out: MemberStatus[] = []
    for (const m of set.members()) {
      const self = m.peerId === this.peerId
      const st = this.links.status(m.peerId)
      const conns = self || node === undefined ? [] : node.getConnections(peerIdFromString(m.peerId))
      const link = st?.link
      if (!self && st?.state === 'dropped' && options.includeDropped !== true) continue
      out.push({
        peerId: m.peerId,
        name: m.name,
        self,
        state: self ? 'up' : (st?.state ?? 'down'),
        link: self ? 'none' : (link?.state ?? (st?.connecting === true ? 'connecting' : 'none')),
        ...(link === undefined ? {} : { path: link.path.type }),
        ...(link?.path.direct === undefined ? {} : { direct: link.path.direct }),
        ...(link?.path.bulk === undefined ? {} : { bulk: link.path.bulk }),
        ...(st?.rttMs === undefined ? {} : { rttMs: st.rttMs }),
        ...(st === undefined ? {} : { lastSeen: st.lastSeen }),
        addedBy: m.addedBy,
        addedAt: m.addedAt,
        ...(conns.length === 0
          ? {}
          : { relayed: conns.every((c) => c.remoteAddr.toString().includes('/p2p-circuit')) }),
      })
    }
    return out
  }

  private requireMember(peer: string): Libp2p {
    const node = this.libp2p
    if (node === undefined) throw new NodeStateError('not started')
    if (!this.ctx.state.isMember(peer)) throw new NotMemberError(peer)
    return node
  }

  async benchStream(
    peer: string,
    bytes: number,
    options: { signal?: AbortSignal } = {},
  ): Promise<StreamBenchResult & { remote: string; direct: boolean }> {
    const node = this.requireMember(peer)
    const signal = options.signal ?? AbortSignal.timeout(BENCH_TIMEOUT_MS)
    const id = peerIdFromString(peer)
    // The connection the direct path uses when there is one; else whatever reaches the peer (relay).
    const direct = node
      .getConnections(id)
      .find((c) => c.status === 'open' && c.direct && c.limits === undefined)
    const stream =
      direct !== undefined
        ? await direct.newStream(STREAM_BENCH_PROTOCOL, { signal })
        : await this.links.dialMember(peer, STREAM_BENCH_PROTOCOL, signal)
    const conn = direct ?? node.getConnections(id).find((c) => c.streams.includes(stream))
    const r = await sendStreamBench(stream, bytes, signal)
    return { ...r, remote: conn?.remoteAddr.toString() ?? '?', direct: conn?.direct === true }
  }

  async ping(peer: string, options: { signal?: AbortSignal } = {}): Promise<number> {
    const node = this.requireMember(peer)
    const services = node.services as {
      ping?: { ping(p: PeerId, o?: { signal?: AbortSignal }): Promise<number> }
    }
    if (services.ping === undefined) throw new NodeStateError('ping service missing')
    const signal = options.signal ?? AbortSignal.timeout(this.timing.requestTimeoutMs)
    // Make sure a dial has the hinted and circuit fallback addresses.
    await this.links.addDialAddrs(peer)
    const rtt = await services.ping.ping(peerIdFromString(peer), { signal })
    this.links.setRtt(peer, rtt)
    return rtt
  }
}
