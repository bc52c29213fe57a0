import './polyfill.ts'
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { circuitRelayServer, circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { identify } from '@libp2p/identify'
import type { Connection, PeerId, Stream, StreamHandler } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { ping } from '@libp2p/ping'
import { preSharedKey } from '@libp2p/pnet'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p, type Libp2p } from 'libp2p'
import { describeError, MeshError, throwIfAborted } from '../src/base/errors.ts'
import { ControlError, ControlTimeoutError } from './control/errors.ts'
import { encodeJson } from './control/framing.ts'
import {
  ADMIT_PROTOCOL,
  type AdmitResponse,
  decodeAdmitRequest,
  decodeAdmitResponse,
  decodeMembersMessage,
  MAX_ADMIT_FRAME,
  MAX_MEMBERS_FRAME,
  MEMBERS_PROTOCOL,
  type MembersMessage,
} from './control/protocols.ts'
import { FramedStream } from './control/stream.ts'
import {
  receiveStreamBench,
  STREAM_BENCH_PROTOCOL,
  type StreamBenchResult,
  sendStreamBench,
} from './diag/stream-bench.ts'
import { type Identity, loadOrCreateIdentity } from './identity/index.ts'
import type {
  LinkFactory,
  MemberState,
  MemberStatus,
  MeshNode,
  MeshNodeEvents,
  MeshNodeInit,
  MeshNodeTiming,
} from './interfaces.ts'
import { createPathLink } from './link/direct/link.ts'
import {
  createDirectPaths,
  DIRECT_PROTOCOL,
  type DirectInbox,
  type DirectPaths,
} from './link/direct/paths.ts'
import type { Link, Overlay } from './link/interfaces.ts'
import {
  AdmissionRefusedError,
  InviteUsedError,
  MembershipError,
  NetworkKeyError,
  NotMemberError,
  PeerRevokedError,
} from './membership/errors.ts'
import type { NetworkInfo, SignedRecord } from './membership/interfaces.ts'
import { createInvite, verifyInvite } from './membership/invite.ts'
import { MemberSet, signEntry, signRevocation } from './membership/member-set.ts'
import { b64u, isValidName, networkInfoFromPublic, pnetKeyOf } from './membership/network.ts'
import { createStreamSignaling, SIGNAL_PROTOCOL, type StreamSignaling } from './signaling/stream-signaling.ts'
import { type StunServer, startStunServer } from './stun/server.ts'
import { createWebRtcLink } from './webrtc/link.ts'

export { ADMIT_PROTOCOL, MEMBERS_PROTOCOL } from './control/protocols.ts'
export { SIGNAL_PROTOCOL } from './signaling/stream-signaling.ts'

export const NETWORK_STATE_FILE = 'network.json'

/** start() was called on a node that has neither joined a network nor holds a network key. */
export class NotJoinedError extends MembershipError {
  constructor(stateDir: string) {
    super(`${stateDir} has not joined a network: run 'mesh join INVITE' (or start with the network key)`, {
      code: 'E_NOT_JOINED',
    })
  }
}

/** The operation needs a running node. */
export class NodeStateError extends MeshError {
  constructor(message: string) {
    super(message, { code: 'E_NODE_STATE' })
  }
}

interface PeerState {
  state: MemberState
  lastSeen: number
  link?: Link & { readonly rttMs?: number }
  signaling?: StreamSignaling
  connecting?: AbortController
  backoffMs: number
  nextAttemptAt: number
  linkOpenedAt?: number
  rttMs?: number
}

type Handler<T> = (detail: T) => void

class NodeOverlay implements Overlay {
  readonly linksByPeer = new Map<string, Link>()
  private readonly listeners = new Set<(link: Link) => void>()
  self = ''
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

const DEFAULT_TIMING: Required<MeshNodeTiming> = {
  memberGraceMs: 10 * 60_000,
  reconnectMaxMs: 3000,
  tickMs: 1000,
  admissionWindowMs: 15_000,
  requestTimeoutMs: 10_000,
  linkAttemptTimeoutMs: 45_000,
}

/** Internals reached through a cast: libp2p 3 has no public API to add a listen address after start. */
interface WithComponents {
  components?: {
    transportManager?: { listen(addrs: ReturnType<typeof multiaddr>[]): Promise<void> }
    registrar?: { getHandler(protocol: string): { handler: StreamHandler; options: Record<string, unknown> } }
  }
}

function errorCode(err: unknown): string {
  return err instanceof MeshError ? err.code : 'E_INTERNAL'
}

export function createMeshNode(init: MeshNodeInit): MeshNode {
  return new MeshNodeImpl(init)
}

class MeshNodeImpl implements MeshNode {
  readonly overlay = new NodeOverlay()
  private readonly timing: Required<MeshNodeTiming>
  private readonly linkFactory: LinkFactory
  private readonly log: (line: string) => void
  private identity: Identity | undefined
  private network: NetworkInfo | undefined
  private set: MemberSet | undefined
  private bootstrap: string[]
  private libp2p: Libp2p | undefined
  private ctl: AbortController | undefined
  private tickTimer: NodeJS.Timeout | undefined
  private readonly peers = new Map<string, PeerState>()
  private readonly handlers = new Map<string, Set<Handler<never>>>()
  private readonly hints = new Map<string, string[]>()
  private readonly pulls = new Map<string, { at: number; result: Promise<boolean> }>()
  private readonly reservationAt = new Map<string, number>()
  private admitChain: Promise<unknown> = Promise.resolve()
  private persistChain: Promise<unknown> = Promise.resolve()
  private ticks = 0
  private selfRevoked = false
  private stun: StunServer | undefined
  private readonly onExternalAbort = () => void this.stop()
  private readonly direct: DirectPaths

  constructor(private readonly init: MeshNodeInit) {
    if (!isValidName(init.name)) throw new MembershipError(`invalid member name '${init.name}'`)
    this.timing = { ...DEFAULT_TIMING, ...init.timing }
    this.linkFactory = init.linkFactory ?? ((o) => createWebRtcLink({ ...init.webrtc, ...o }))
    this.log = init.log ?? (() => {})
    this.bootstrap = [...(init.bootstrap ?? [])]
    this.direct = createDirectPaths({
      libp2p: () => this.libp2p,
      hints: (peer) => this.hints.get(peer) ?? [],
      enabled: init.direct !== false,
      log: this.log,
    })
  }

  get peerId(): string {
    return this.identity?.peerId.toString() ?? ''
  }
  get networkId(): string | undefined {
    return this.network?.id
  }
  get networkName(): string | undefined {
    return this.network?.name
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
        this.log(`event handler for ${event} failed: ${describeError(err)}`)
      }
    }
  }

  // ---------------------------------------------------------------- state

  private statePath(): string {
    return join(this.init.stateDir, NETWORK_STATE_FILE)
  }

  private async loadState(): Promise<void> {
    let text: string
    try {
      text = await readFile(this.statePath(), 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
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
      throw new MembershipError(`${this.statePath()} is corrupt`, { cause: err })
    }
    if (typeof o.network?.name !== 'string' || typeof o.network.publicKey !== 'string')
      throw new MembershipError(`${this.statePath()} lacks the network`)
    const network = networkInfoFromPublic(o.network.name, o.network.publicKey)
    const set = new MemberSet(network)
    if (Array.isArray(o.records)) await set.merge(o.records)
    this.network = network
    this.set = set
    if (Array.isArray(o.bootstrap))
      for (const b of o.bootstrap)
        if (typeof b === 'string' && !this.bootstrap.includes(b)) this.bootstrap.push(b)
  }

  /** Serialised, atomic (write + rename), owner-only. */
  private persist(): Promise<void> {
    const network = this.network
    const set = this.set
    if (network === undefined || set === undefined) return Promise.resolve()
    const next = this.persistChain.then(async () => {
      await mkdir(this.init.stateDir, { recursive: true, mode: 0o700 })
      const body = JSON.stringify({
        v: 1,
        network: { name: network.name, id: network.id, publicKey: b64u(network.publicKey) },
        bootstrap: this.bootstrap,
        records: set.list(),
      })
      const tmp = `${this.statePath()}.${process.pid}.tmp`
      await writeFile(tmp, body, { mode: 0o600 })
      await rename(tmp, this.statePath())
    })
    this.persistChain = next.catch((err) => this.log(`cannot save member set: ${describeError(err)}`))
    return next
  }

  // ---------------------------------------------------------------- lifecycle

  async start(): Promise<void> {
    if (this.libp2p !== undefined) return
    throwIfAborted(this.init.signal)
    this.identity ??= await loadOrCreateIdentity(this.init.stateDir)
    this.overlay.self = this.peerId
    await this.loadState()
    const key = this.init.networkKey
    if (key !== undefined) {
      if (this.network !== undefined && this.network.id !== key.info.id)
        throw new NetworkKeyError(`this node is in network ${this.network.id}, the key is for ${key.info.id}`)
      this.network ??= key.info
      this.set ??= new MemberSet(key.info)
      if (!this.set.isMember(this.peerId) && !this.set.isRevoked(this.peerId)) {
        // The key holder admits itself with a short invite bound to itself: its entry then verifies
        // exactly like everyone else's.
        const inv = await createInvite(key, { bootstrap: [], ttlMs: 60_000, boundPeer: this.peerId })
        await this.set.add(
          await signEntry(this.identity.privateKey, {
            peerId: this.peerId,
            name: this.init.name,
            invite: inv.encoded,
            addedBy: this.peerId,
            addedAt: Date.now(),
          }),
        )
        await this.persist()
      }
    }
    if (this.network === undefined && this.init.invite !== undefined) await this.join(this.init.invite)
    const network = this.network
    const set = this.set
    if (network === undefined || set === undefined) throw new NotJoinedError(this.init.stateDir)
    if (set.isRevoked(this.peerId)) throw new PeerRevokedError(this.peerId)
    if (!set.isMember(this.peerId)) throw new NotMemberError(this.peerId)

    this.ctl = new AbortController()
    this.init.signal?.addEventListener('abort', this.onExternalAbort, { once: true })
    const relay = this.init.bootstrapRole?.relay === true
    const node = await createLibp2p({
      // Not yet: handlers and the member checks must be in place before the first connection.
      start: false,
      privateKey: this.identity.privateKey,
      addresses: {
        listen: this.init.listen ?? ['/ip4/0.0.0.0/tcp/0'],
        ...(this.init.announce === undefined ? {} : { announce: this.init.announce }),
      },
      transports: [tcp(), circuitRelayTransport()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      ...(this.init.pnet === true ? { connectionProtector: preSharedKey({ psk: pnetKeyOf(network) }) } : {}),
      connectionGater: this.gater(),
      // libp2p's monitor pings every connection and, by default, aborts one whose ping fails. Its ping
      // collided with our own (`mesh ping`, RTT ticks) on the ping protocol's one-stream limit and then
      // killed a healthy connection carrying direct-path streams mid-transfer. Liveness is the links'
      // heartbeat's job: the monitor only measures.
      connectionMonitor: { abortConnectionOnPingFailure: false },
      services: {
        identify: identify(),
        ping: ping({ maxOutboundStreams: 4, maxInboundStreams: 4 }),
        // The relay carries members' signaling and control streams, not bulk data (that goes over
        // WebRTC): no default data/duration limit, so relayed connections are not "limited".
        ...(relay
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
    this.libp2p = node
    const opts = { runOnLimitedConnection: true, maxInboundStreams: 64 }
    await node.handle(ADMIT_PROTOCOL, (s, c) => this.handleAdmit(s, c), { ...opts, maxInboundStreams: 4 })
    await node.handle(
      MEMBERS_PROTOCOL,
      this.guard(MEMBERS_PROTOCOL, (s, c) => this.handleMembers(s, c)),
      opts,
    )
    await node.handle(
      SIGNAL_PROTOCOL,
      this.guard(SIGNAL_PROTOCOL, (s, c) => this.handleSignal(s, c)),
      opts,
    )
    // Direct paths exist only on direct connections: no runOnLimitedConnection.
    await node.handle(
      DIRECT_PROTOCOL,
      this.guard(DIRECT_PROTOCOL, (s, c) => this.direct.handle(s, c)),
      { maxInboundStreams: 16 },
    )
    await node.handle(
      STREAM_BENCH_PROTOCOL,
      this.guard(STREAM_BENCH_PROTOCOL, async (s) => receiveStreamBench(s)),
      { runOnLimitedConnection: true, maxInboundStreams: 2 },
    )
    node.addEventListener('connection:open', (evt) => this.onConnectionOpen(evt.detail))
    node.addEventListener('connection:close', (evt) => {
      const peer = evt.detail.remotePeer.toString()
      const st = this.peers.get(peer)
      if (st !== undefined) this.observe(peer, st)
    })
    try {
      await node.start()
      // identify and ping register their handlers when they start: wrap them right after (a stranger's
      // stream in between would still find no mesh protocol open, only these two).
      await this.guardBuiltins(node)
      const stunPort = this.init.bootstrapRole?.stunPort
      if (stunPort !== undefined)
        this.stun = await startStunServer({ port: stunPort, signal: this.ctl.signal })
    } catch (err) {
      this.libp2p = undefined
      this.ctl.abort()
      this.init.signal?.removeEventListener('abort', this.onExternalAbort)
      await Promise.resolve(node.stop()).catch(() => {})
      throw new ControlError(
        `cannot start the control plane on ${(this.init.listen ?? ['/ip4/0.0.0.0/tcp/0']).join(' ')}: ${describeError(err)}`,
        { cause: err },
      )
    }
    for (const m of set.members()) if (m.peerId !== this.peerId) this.peerState(m.peerId)
    this.log(`mesh node ${this.peerId} (${this.init.name}) up on ${this.addresses().join(' ')}`)
    for (const b of this.bootstrap) void this.dialBootstrap(b)
    this.tickTimer = setInterval(() => this.tick(), this.timing.tickMs)
    this.tickTimer.unref?.()
  }

  async stop(): Promise<void> {
    const node = this.libp2p
    if (node === undefined) return
    this.libp2p = undefined
    this.init.signal?.removeEventListener('abort', this.onExternalAbort)
    if (this.tickTimer !== undefined) clearInterval(this.tickTimer)
    this.ctl?.abort(new NodeStateError('node stopped'))
    for (const st of this.peers.values()) {
      st.connecting?.abort()
      st.link?.close()
      st.signaling?.close()
    }
    this.peers.clear()
    this.direct.stop()
    await this.stun?.close()
    this.stun = undefined
    await this.persistChain
    await node.stop()
  }

  addresses(): string[] {
    return this.libp2p?.getMultiaddrs().map((a) => a.toString()) ?? []
  }

  // ---------------------------------------------------------------- membership gate

  private gater() {
    const revoked = (p: PeerId) => this.set?.isRevoked(p.toString()) === true
    return {
      // A revoked peer may still connect: its first stream is refused with a clear reason (and the
      // admission window then closes the connection), which is what its operator needs to see.
      denyDialPeer: (p: PeerId) => revoked(p),
      denyOutboundEncryptedConnection: (p: PeerId) => revoked(p),
      denyInboundRelayedConnection: (_relay: PeerId, p: PeerId) => revoked(p),
      // Only members may hold a reservation on our relay, or be relayed by it, and only to members.
      denyInboundRelayReservation: async (p: PeerId) => {
        const ok = await this.ensureMember(p.toString())
        if (!ok) this.refuse(p.toString(), 'relay-reservation', new NotMemberError(p.toString()))
        return !ok
      },
      denyOutboundRelayedConnection: async (src: PeerId, dst: PeerId) =>
        !((await this.ensureMember(src.toString())) && this.set?.isMember(dst.toString()) === true),
    }
  }

  private refuse(peer: string, protocol: string, err: Error): void {
    const code = errorCode(err)
    this.log(`refused ${peer} on ${protocol}: ${describeError(err)}`)
    this.emit('refused', { peer, protocol, code, reason: describeError(err) })
  }

  /**
   * True when `peer` is a current member. A peer we do not know yet may have just been admitted by
   * another member whose gossip has not reached us: ask the peer itself for the records about it (they
   * are self-verifying), at most once per peer per 10 s so strangers cannot make us work much.
   */
  private ensureMember(peer: string): Promise<boolean> {
    const set = this.set
    if (set === undefined) return Promise.resolve(false)
    if (set.isMember(peer)) return Promise.resolve(true)
    if (set.isRevoked(peer) || this.libp2p === undefined) return Promise.resolve(false)
    const prev = this.pulls.get(peer)
    if (prev !== undefined && Date.now() - prev.at < 10_000) return prev.result.then(() => set.isMember(peer))
    const result = this.exchange(peer, 'self', Math.min(this.timing.requestTimeoutMs, 5000))
      .then(() => set.isMember(peer))
      .catch(() => false)
    this.pulls.set(peer, { at: Date.now(), result })
    return result
  }

  private guard(
    protocol: string,
    handler: (stream: Stream, conn: Connection) => Promise<void>,
  ): StreamHandler {
    return async (stream, conn) => {
      const peer = conn.remotePeer.toString()
      if (!(await this.ensureMember(peer))) {
        const err = this.set?.isRevoked(peer) === true ? new PeerRevokedError(peer) : new NotMemberError(peer)
        this.refuse(peer, protocol, err)
        stream.abort(err)
        return
      }
      try {
        await handler(stream, conn)
      } catch (err) {
        this.log(`${protocol} from ${peer}: ${describeError(err)}`)
        stream.abort(err as Error)
      }
    }
  }

  /** identify and ping are registered by libp2p itself; put the same member check in front of them. */
  private async guardBuiltins(node: Libp2p): Promise<void> {
    const registrar = (node as unknown as WithComponents).components?.registrar
    if (registrar === undefined) return
    for (const protocol of node.getProtocols()) {
      if ([ADMIT_PROTOCOL, MEMBERS_PROTOCOL, SIGNAL_PROTOCOL].includes(protocol)) continue
      if (protocol.includes('/libp2p/circuit/relay/')) continue // gated by the connection gater
      let rec: ReturnType<NonNullable<typeof registrar>['getHandler']>
      try {
        rec = registrar.getHandler(protocol)
      } catch {
        continue
      }
      const original = rec.handler
      await node.handle(
        protocol,
        this.guard(protocol, async (s, c) => {
          await original(s, c)
        }),
        { ...rec.options, force: true },
      )
    }
  }

  private onConnectionOpen(conn: Connection): void {
    const peer = conn.remotePeer.toString()
    if (this.set?.isMember(peer) === true) {
      const st = this.peers.get(peer)
      if (st !== undefined) this.observe(peer, st)
      void this.exchange(peer, 'all', this.timing.requestTimeoutMs).catch((err) =>
        this.log(`member sync with ${peer} failed: ${describeError(err)}`),
      )
      return
    }
    // A stranger may connect to present an invite; it gets a bounded window to do so.
    const timer = setTimeout(() => {
      if (this.libp2p === undefined || this.set?.isMember(peer) === true) return
      if (conn.status !== 'open') return
      this.refuse(peer, 'connection', new NotMemberError(peer))
      void conn.close().catch(() => {})
    }, this.timing.admissionWindowMs)
    timer.unref?.()
  }

  // ---------------------------------------------------------------- admission

  async join(invite: string, options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this.libp2p !== undefined) throw new NodeStateError('join() needs a stopped node')
    this.identity ??= await loadOrCreateIdentity(this.init.stateDir)
    const self = this.peerId
    if (this.network === undefined) await this.loadState()
    const inv = await verifyInvite(invite, { presenter: self })
    const network = networkInfoFromPublic(inv.body.networkName, inv.body.networkPublicKey)
    if (this.network !== undefined) {
      if (this.network.id !== network.id)
        throw new MembershipError(
          `this state dir is already in network ${this.network.id}; use another state dir`,
        )
      if (this.set?.isMember(self) === true) return
    }
    const addrs = [...new Set([...inv.body.bootstrap, ...this.bootstrap])]
    if (addrs.length === 0) throw new MembershipError('the invite names no bootstrap address')
    const tmp = await createLibp2p({
      privateKey: this.identity.privateKey,
      addresses: { listen: [] },
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      ...(this.init.pnet === true ? { connectionProtector: preSharedKey({ psk: pnetKeyOf(network) }) } : {}),
    })
    await tmp.start()
    let lastErr: unknown
    try {
      for (const addr of addrs) {
        const signal = AbortSignal.any([
          AbortSignal.timeout(this.timing.requestTimeoutMs),
          ...(options.signal ? [options.signal] : []),
        ])
        let resp: AdmitResponse
        try {
          const stream = await tmp.dialProtocol(multiaddr(addr), ADMIT_PROTOCOL, { signal })
          const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
          framed.write(
            new TextEncoder().encode(JSON.stringify({ invite: inv.encoded, name: this.init.name })),
          )
          resp = decodeAdmitResponse(await framed.read({ signal, what: `admission at ${addr}` }))
          await framed.close()
        } catch (err) {
          if (options.signal?.aborted === true) throw err
          lastErr = err
          this.log(`admission via ${addr} failed: ${describeError(err)}`)
          continue
        }
        // A refusal is the network's answer (every member applies the same rules): do not shop around.
        if (!resp.ok) throw new AdmissionRefusedError(resp.reason, { code: resp.code })
        const set = new MemberSet(network)
        await set.merge(resp.records)
        if (!set.isMember(self)) throw new AdmissionRefusedError('the member did not record our admission')
        this.network = network
        this.set = set
        for (const b of inv.body.bootstrap) if (!this.bootstrap.includes(b)) this.bootstrap.push(b)
        await this.persist()
        this.log(
          `joined network ${network.name} (${network.id}) via ${addr}; ${set.members().length} members`,
        )
        return
      }
    } finally {
      await tmp.stop()
    }
    throw new AdmissionRefusedError(`no bootstrap reachable (${describeError(lastErr)})`, {
      cause: lastErr,
      code: 'E_NO_BOOTSTRAP',
    })
  }

  private async handleAdmit(stream: Stream, conn: Connection): Promise<void> {
    const peer = conn.remotePeer.toString()
    const framed = new FramedStream(stream, MAX_ADMIT_FRAME)
    const reply = (resp: AdmitResponse) => {
      framed.write(encodeJson(resp, MAX_MEMBERS_FRAME).subarray(4))
      void framed.close()
    }
    try {
      const req = decodeAdmitRequest(
        await framed.read({ timeoutMs: this.timing.requestTimeoutMs, what: 'invite' }),
      )
      // One admission at a time: the nonce check and the entry that uses the nonce must not interleave.
      const run = this.admitChain.then(() => this.admit(peer, req.invite, req.name))
      this.admitChain = run.catch(() => {})
      await run
      reply({ ok: true, records: this.set?.list() ?? [] })
    } catch (err) {
      this.refuse(peer, ADMIT_PROTOCOL, err as Error)
      if (err instanceof MembershipError || err instanceof ControlError) {
        try {
          reply({ ok: false, code: err.code, reason: describeError(err) })
        } catch {
          stream.abort(err)
        }
      } else stream.abort(err as Error)
    }
  }

  private async admit(peer: string, invite: string, name: string): Promise<void> {
    const set = this.set
    const network = this.network
    const identity = this.identity
    if (set === undefined || network === undefined || identity === undefined)
      throw new NodeStateError('not started')
    if (set.isRevoked(peer)) throw new PeerRevokedError(peer)
    if (set.isMember(peer)) return
    const inv = await verifyInvite(invite, { network, presenter: peer })
    const holder = set.nonceHolder(inv.body.nonce)
    if (holder !== undefined && holder !== peer) throw new InviteUsedError(holder)
    const record = await signEntry(identity.privateKey, {
      peerId: peer,
      name,
      invite: inv.encoded,
      addedBy: this.peerId,
      addedAt: Date.now(),
    })
    await set.add(record)
    this.log(`admitted ${peer} (${name})`)
    this.emit('admitted', { peer, name })
    // Not back to the joiner: it gets the set in the admission reply (and its admission node serves
    // nothing else).
    this.onSetChanged(peer)
  }

  async invite(options: { ttlMs: number; bind?: string; bootstrap?: string[] }): Promise<string> {
    const key = this.init.networkKey
    if (key === undefined) throw new NetworkKeyError('making an invite needs the network key')
    const bootstrap =
      options.bootstrap ??
      [
        ...(this.init.bootstrapRole?.relay === true || this.bootstrap.length === 0
          ? this.addresses().filter((a) => !a.includes('/p2p-circuit'))
          : []),
        ...this.bootstrap,
      ].slice(0, 16)
    const inv = await createInvite(key, {
      bootstrap,
      ttlMs: options.ttlMs,
      ...(options.bind === undefined ? {} : { boundPeer: options.bind }),
    })
    return inv.encoded
  }

  async revoke(peer: string): Promise<void> {
    const key = this.init.networkKey
    if (key === undefined) throw new NetworkKeyError('revoking a member needs the network key')
    if (this.set === undefined) throw new NodeStateError('not started')
    if (peer === this.peerId) throw new MembershipError('a node cannot revoke itself')
    if (this.set.isRevoked(peer)) return
    await this.set.add(await signRevocation(key, peer))
    this.log(`revoked ${peer}`)
    this.onSetChanged(undefined)
  }

  // ---------------------------------------------------------------- replication

  private addrHints(): Record<string, string[]> {
    const out: Record<string, string[]> = {}
    for (const [p, list] of this.hints) if (this.set?.isMember(p) === true) out[p] = list
    const own = this.addresses().slice(0, 16)
    if (own.length > 0) out[this.peerId] = own
    return out
  }

  private learnHints(addrs: Readonly<Record<string, readonly string[]>>): void {
    for (const [p, list] of Object.entries(addrs)) {
      if (p === this.peerId || this.set?.isMember(p) !== true) continue
      this.hints.set(p, list.slice(0, 16))
    }
  }

  /** Records about `peer` only (its entries and any revocation of it): what `want: 'self'` returns. */
  private recordsAbout(peer: string): SignedRecord[] {
    return (this.set?.list() ?? []).filter((r) => {
      try {
        const body = JSON.parse(Buffer.from(r.body, 'base64url').toString('utf8')) as { peerId?: unknown }
        return body.peerId === peer
      } catch {
        return false
      }
    })
  }

  /** Push-pull with one peer: send what we have (unless pulling `self` only), merge what comes back. */
  private async exchange(
    peer: string,
    want: 'all' | 'self',
    timeoutMs: number,
    notice = false,
  ): Promise<void> {
    const node = this.libp2p
    const set = this.set
    if (node === undefined || set === undefined) return
    // A revoked peer only ever gets the one-way notice from evict(); nothing it says is merged.
    if (set.isRevoked(peer) && !notice) return
    const signal = AbortSignal.timeout(timeoutMs)
    const stream = await node.dialProtocol(peerIdFromString(peer), MEMBERS_PROTOCOL, {
      signal,
      runOnLimitedConnection: true,
    })
    const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
    const msg: MembersMessage = { want, records: want === 'all' ? set.list() : [], addrs: this.addrHints() }
    framed.write(new TextEncoder().encode(JSON.stringify(msg)))
    if (notice) {
      await framed.close()
      return
    }
    const resp = decodeMembersMessage(await framed.read({ signal, what: 'member set' }))
    await framed.close()
    const { added, invalid } = await set.merge(resp.records)
    if (invalid > 0) this.log(`member set from ${peer}: ${invalid} invalid records ignored`)
    this.learnHints(resp.addrs)
    if (added > 0) this.onSetChanged(peer)
  }

  private async handleMembers(stream: Stream, conn: Connection): Promise<void> {
    const peer = conn.remotePeer.toString()
    const set = this.set
    if (set === undefined) throw new NodeStateError('not started')
    const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
    const req = decodeMembersMessage(await framed.read({ timeoutMs: this.timing.requestTimeoutMs }))
    const { added, invalid } = await set.merge(req.records)
    if (invalid > 0) this.log(`member set from ${peer}: ${invalid} invalid records ignored`)
    this.learnHints(req.addrs)
    const records =
      req.want === 'all' ? set.list() : req.want === 'self' ? this.recordsAbout(this.peerId) : []
    const resp: MembersMessage = { want: 'none', records, addrs: req.want === 'self' ? {} : this.addrHints() }
    framed.write(new TextEncoder().encode(JSON.stringify(resp)))
    await framed.close()
    if (added > 0) this.onSetChanged(peer)
  }

  /** After any change: save, enforce revocations, and push to every connected member (except the source:
   *  it already has what we merged from it). Gossip stops by itself once an exchange adds nothing. */
  private onSetChanged(source: string | undefined): void {
    const set = this.set
    const node = this.libp2p
    if (set === undefined) return
    void this.persist().catch(() => {})
    this.emit('members-changed', { members: set.members().length })
    if (set.isRevoked(this.peerId) && !this.selfRevoked) {
      this.selfRevoked = true
      this.log('this node has been revoked from the network; closing all links')
      this.emit('self-revoked', { network: this.network?.id ?? '' })
    }
    for (const [peer, st] of this.peers) {
      if (this.selfRevoked || set.isRevoked(peer)) {
        st.connecting?.abort()
        st.link?.close(new PeerRevokedError(peer))
        st.signaling?.close()
        this.peers.delete(peer)
        if (node !== undefined && !this.selfRevoked) void this.evict(peer)
      }
    }
    if (this.selfRevoked) {
      for (const l of this.overlay.links()) l.close(new PeerRevokedError(this.peerId))
      if (node !== undefined) for (const c of node.getConnections()) void c.close().catch(() => {})
      return
    }
    for (const m of set.members()) if (m.peerId !== this.peerId) this.peerState(m.peerId)
    if (node === undefined) return
    const connected = new Set(node.getConnections().map((c) => c.remotePeer.toString()))
    for (const peer of connected) {
      if (peer === source || !set.isMember(peer)) continue
      void this.exchange(peer, 'all', this.timing.requestTimeoutMs).catch((err) =>
        this.log(`gossip to ${peer} failed: ${describeError(err)}`),
      )
    }
  }

  /** Tells a revoked peer (it then stops knocking: `self-revoked`), then hangs up on it. */
  private async evict(peer: string): Promise<void> {
    const node = this.libp2p
    if (node === undefined) return
    const id = peerIdFromString(peer)
    if (node.getConnections(id).length > 0) {
      await this.exchange(peer, 'all', 2000, true).catch(() => {})
    }
    await node.hangUp(id).catch(() => {})
  }

  // ---------------------------------------------------------------- links

  private peerState(peer: string): PeerState {
    let st = this.peers.get(peer)
    if (st === undefined) {
      st = { state: 'down', lastSeen: Date.now(), backoffMs: 0, nextAttemptAt: 0 }
      this.peers.set(peer, st)
    }
    return st
  }

  private circuitAddrs(peer: string): string[] {
    return this.bootstrap
      .filter((b) => !b.endsWith(`/p2p/${peer}`) && !b.endsWith(`/p2p/${this.peerId}`))
      .map((b) => `${b}/p2p-circuit/p2p/${peer}`)
  }

  private async dialMember(peer: string, protocol: string, signal: AbortSignal): Promise<Stream> {
    const node = this.libp2p
    if (node === undefined) throw new NodeStateError('not started')
    await this.addDialAddrs(peer)
    return node.dialProtocol(peerIdFromString(peer), protocol, { signal, runOnLimitedConnection: true })
  }

  /** Teaches the peer store how to reach a member: its own address hints, then every bootstrap's relay. */
  private async addDialAddrs(peer: string): Promise<void> {
    const node = this.libp2p
    if (node === undefined) return
    const id = peerIdFromString(peer)
    if (node.getConnections(id).length === 0) {
      const hinted = (this.hints.get(peer) ?? []).filter((a) => !a.includes('/p2p-circuit'))
      const addrs = [...hinted, ...this.circuitAddrs(peer)]
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

  private async dialBootstrap(addr: string): Promise<void> {
    const node = this.libp2p
    if (node === undefined || addr.endsWith(`/p2p/${this.peerId}`)) return
    try {
      await node.dial(multiaddr(addr), { signal: AbortSignal.timeout(this.timing.requestTimeoutMs) })
    } catch (err) {
      this.log(`bootstrap ${addr} unreachable: ${describeError(err)}`)
    }
  }

  /** The lower PeerId initiates each pair's link, so two ends never both offer (glare). */
  private isInitiator(peer: string): boolean {
    return this.peerId < peer
  }

  private startLinkAttempt(peer: string, st: PeerState): void {
    const parent = this.ctl
    if (parent === undefined) return
    const ctl = new AbortController()
    const onParent = () => ctl.abort(parent.signal.reason)
    parent.signal.addEventListener('abort', onParent, { once: true })
    st.connecting = ctl
    const run = async () => {
      try {
        const stream = await this.dialMember(
          peer,
          SIGNAL_PROTOCOL,
          AbortSignal.any([ctl.signal, AbortSignal.timeout(15_000)]),
        )
        await this.buildLink(peer, stream, true, ctl)
      } catch (err) {
        // Stopped, revoked, or superseded by the peer's own attempt: no retry from here.
        if (parent.signal.aborted || st.connecting !== ctl || this.peers.get(peer) !== st) return
        this.scheduleRetry(st, `link attempt to ${peer} failed: ${describeError(err)}`)
      } finally {
        parent.signal.removeEventListener('abort', onParent)
        if (st.connecting === ctl) st.connecting = undefined
      }
    }
    void run()
  }

  /**
   * One link attempt over an open signaling stream, from either end: the link factory, bounded by
   * boundAttempt, then attachLink. On failure the signaling stream is closed and the error rethrown.
   */
  private async buildLink(
    peer: string,
    stream: Stream,
    initiator: boolean,
    ctl: AbortController,
  ): Promise<void> {
    const signaling = createStreamSignaling(stream, { log: this.log })
    // Subscribed now: the peer's direct-path offer may come as soon as its end of the link is up.
    const inbox = this.direct.inbox(signaling)
    const settle = this.boundAttempt(ctl, signaling)
    try {
      let link: Awaited<ReturnType<LinkFactory>>
      try {
        link = await this.linkFactory({
          peer,
          initiator,
          signaling,
          iceServers: this.init.iceServers ?? [],
          signal: ctl.signal,
        })
      } finally {
        settle()
      }
      this.attachLink(peer, link, signaling, inbox, initiator)
    } catch (err) {
      inbox.close()
      signaling.close()
      throw err
    }
  }

  /**
   * Bounds a pending link attempt: aborts `ctl` after linkAttemptTimeoutMs, or as soon as the signaling
   * stream dies before the link is up (its libp2p connection closed): waiting for an answer that can no
   * longer arrive would stall the pair for the whole timeout. Call the returned function when the
   * attempt settles. The link factory's signal bounds the link's whole life, which is why these limits
   * are not simply AbortSignal.timeout() in that signal: they must stop applying once the link is up.
   */
  private boundAttempt(ctl: AbortController, signaling: StreamSignaling): () => void {
    const timer = setTimeout(
      () => ctl.abort(new ControlTimeoutError(`link attempt (${this.timing.linkAttemptTimeoutMs} ms)`)),
      this.timing.linkAttemptTimeoutMs,
    )
    const offEnd = signaling.onEnd((err) => ctl.abort(err))
    return () => {
      clearTimeout(timer)
      offEnd()
    }
  }

  private scheduleRetry(st: PeerState, why: string): void {
    st.backoffMs = Math.min(Math.max(250, st.backoffMs * 2), this.timing.reconnectMaxMs)
    st.nextAttemptAt = Date.now() + st.backoffMs
    this.log(`${why}; retry in ${st.backoffMs} ms`)
  }

  private async handleSignal(stream: Stream, conn: Connection): Promise<void> {
    const peer = conn.remotePeer.toString()
    if (this.isInitiator(peer)) {
      // The pair's initiator is us; an offer from the other end is a protocol violation (or an old
      // version): refuse rather than build two links.
      stream.abort(new ControlError(`${peer} must not initiate the link (lower PeerId initiates)`))
      return
    }
    const st = this.peerState(peer)
    // The initiator only opens a new attempt when its old link is gone: drop ours too.
    st.connecting?.abort()
    st.link?.close(new ControlError('peer started a new link'))
    const parent = this.ctl
    if (parent === undefined) return
    const ctl = new AbortController()
    const onParent = () => ctl.abort(parent.signal.reason)
    parent.signal.addEventListener('abort', onParent, { once: true })
    st.connecting = ctl
    try {
      await this.buildLink(peer, stream, false, ctl)
    } catch (err) {
      if (!parent.signal.aborted) this.log(`link from ${peer} failed: ${describeError(err)}`)
    } finally {
      parent.signal.removeEventListener('abort', onParent)
      if (st.connecting === ctl) st.connecting = undefined
    }
  }

  private attachLink(
    peer: string,
    rawLink: Link & { readonly rttMs?: number },
    signaling: StreamSignaling,
    inbox: DirectInbox,
    initiator: boolean,
  ): void {
    // Every link is a PathLink: its bulk channels may move to a direct connection once it is up.
    const link = createPathLink(rawLink)
    const st = this.peers.get(peer)
    if (
      this.libp2p === undefined ||
      st === undefined ||
      this.set?.isMember(peer) !== true ||
      link.state === 'closed'
    ) {
      link.close(new NotMemberError(peer))
      inbox.close()
      signaling.close()
      return
    }
    if (st.link !== undefined && st.link !== link) st.link.close(new ControlError('replaced by a new link'))
    st.link = link
    st.signaling = signaling
    st.linkOpenedAt = Date.now()
    this.overlay.attach(link)
    this.log(`link to ${peer} up (${link.path.type})`)
    this.emit('link-up', { peer, path: link.path.type })
    this.observe(peer, st)
    link.onClose((reason) => {
      this.overlay.detach(link)
      signaling.close()
      if (st.link !== link) return
      st.link = undefined
      st.signaling = undefined
      const lived = Date.now() - (st.linkOpenedAt ?? 0)
      this.emit('link-down', { peer, ...(reason === undefined ? {} : { reason: describeError(reason) }) })
      this.observe(peer, st)
      // A link that lived a while is rebuilt at once; one that keeps dying backs off (capped).
      if (lived > 10_000) st.backoffMs = 0
      st.nextAttemptAt = st.backoffMs === 0 ? 0 : Date.now() + st.backoffMs
      this.log(`link to ${peer} down: ${reason === undefined ? 'closed' : describeError(reason)}`)
    })
    // In the background: the link is already usable; its bulk channels move if a direct path exists.
    const upgrade = new AbortController()
    link.onClose(() => upgrade.abort(new ControlError('link closed')))
    void this.direct.negotiate(link, { signaling, inbox, initiator, signal: upgrade.signal }).then(() => {
      if (link.path.direct !== undefined && link.state === 'open')
        this.emit('link-direct', { peer, remote: link.path.direct })
    })
  }

  // ---------------------------------------------------------------- supervision

  private tick(): void {
    const node = this.libp2p
    const set = this.set
    if (node === undefined || set === undefined || this.selfRevoked) return
    this.ticks++
    const now = Date.now()
    for (const [peer, st] of this.peers) {
      if (!set.isMember(peer)) continue
      const conns = node.getConnections(peerIdFromString(peer))
      this.observe(peer, st, now)
      if (
        st.state !== 'dropped' &&
        this.isInitiator(peer) &&
        st.link === undefined &&
        st.connecting === undefined &&
        now >= st.nextAttemptAt
      ) {
        st.nextAttemptAt = now + this.timing.reconnectMaxMs
        this.startLinkAttempt(peer, st)
      }
      if (st.link?.rttMs !== undefined) st.rttMs = st.link.rttMs
      else if (conns.length > 0 && this.ticks % 5 === 0) void this.ping(peer).catch(() => {})
    }
    if (this.init.bootstrapRole?.relay !== true) this.keepReservations(now)
    // Anti-entropy: now and then a full exchange with one connected member heals any missed gossip.
    if (this.ticks % 30 === 0) {
      const conns = node.getConnections().filter((c) => set.isMember(c.remotePeer.toString()))
      const c = conns[Math.floor(Math.random() * conns.length)]
      if (c !== undefined)
        void this.exchange(c.remotePeer.toString(), 'all', this.timing.requestTimeoutMs).catch(() => {})
    }
  }

  /** Moves a member between up / down / dropped (and emits the change). Called on every tick and at
   *  once when a link or connection to it opens or closes. */
  private observe(peer: string, st: PeerState, now = Date.now()): void {
    const node = this.libp2p
    if (node === undefined || this.set?.isMember(peer) !== true) return
    const up = st.link?.state === 'open' || node.getConnections(peerIdFromString(peer)).length > 0
    if (up) {
      st.lastSeen = now
      if (st.state !== 'up') {
        st.state = 'up'
        this.emit('member-up', { peer })
      }
    } else if (st.state === 'up') {
      st.state = 'down'
      this.emit('member-down', { peer })
    } else if (st.state === 'down' && now - st.lastSeen > this.timing.memberGraceMs) {
      st.state = 'dropped'
      this.log(`member ${peer} gone for ${Math.round((now - st.lastSeen) / 1000)} s: dropped`)
      this.emit('member-dropped', { peer })
    }
  }

  /** Keeps a circuit-relay reservation on every bootstrap, so members behind NAT can be dialled. */
  private keepReservations(now: number): void {
    const node = this.libp2p
    if (node === undefined) return
    const tm = (node as unknown as WithComponents).components?.transportManager
    if (tm === undefined) return
    const mine = this.addresses()
    for (const b of this.bootstrap) {
      const relayId = b.split('/p2p/').pop()
      if (relayId === undefined || relayId === this.peerId || this.set?.isMember(relayId) !== true) continue
      if (mine.some((a) => a.includes(`/p2p/${relayId}/p2p-circuit`))) continue
      if (now < (this.reservationAt.get(b) ?? 0)) continue
      this.reservationAt.set(b, now + 10_000)
      void tm.listen([multiaddr(`${b}/p2p-circuit`)]).catch((err) => {
        this.log(`relay reservation on ${b} failed: ${describeError(err)}`)
      })
    }
  }

  // ---------------------------------------------------------------- queries

  members(options: { includeDropped?: boolean } = {}): MemberStatus[] {
    const set = this.set
    if (set === undefined) return []
    const node = this.libp2p
    const out: MemberStatus[] = []
    for (const m of set.members()) {
      const self = m.peerId === this.peerId
      const st = this.peers.get(m.peerId)
      const conns = self || node === undefined ? [] : node.getConnections(peerIdFromString(m.peerId))
      const link = st?.link
      if (!self && st?.state === 'dropped' && options.includeDropped !== true) continue
      out.push({
        peerId: m.peerId,
        name: m.name,
        self,
        state: self ? 'up' : (st?.state ?? 'down'),
        link: self ? 'none' : (link?.state ?? (st?.connecting === undefined ? 'none' : 'connecting')),
        ...(link === undefined ? {} : { path: link.path.type }),
        ...(link?.path.direct === undefined ? {} : { direct: link.path.direct }),
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

  async benchStream(
    peer: string,
    bytes: number,
    options: { signal?: AbortSignal } = {},
  ): Promise<StreamBenchResult & { remote: string; direct: boolean }> {
    const node = this.libp2p
    if (node === undefined) throw new NodeStateError('not started')
    if (this.set?.isMember(peer) !== true) throw new NotMemberError(peer)
    const signal = options.signal ?? AbortSignal.timeout(600_000)
    const id = peerIdFromString(peer)
    // The connection the direct path uses when there is one; else whatever reaches the peer (relay).
    const direct = node
      .getConnections(id)
      .find((c) => c.status === 'open' && c.direct && c.limits === undefined)
    const stream =
      direct !== undefined
        ? await direct.newStream(STREAM_BENCH_PROTOCOL, { signal })
        : await this.dialMember(peer, STREAM_BENCH_PROTOCOL, signal)
    const conn = direct ?? node.getConnections(id).find((c) => c.streams.includes(stream))
    const r = await sendStreamBench(stream, bytes, signal)
    return { ...r, remote: conn?.remoteAddr.toString() ?? '?', direct: conn?.direct === true }
  }

  async ping(peer: string, options: { signal?: AbortSignal } = {}): Promise<number> {
    const node = this.libp2p
    if (node === undefined) throw new NodeStateError('not started')
    if (this.set?.isMember(peer) !== true) throw new NotMemberError(peer)
    const services = node.services as {
      ping?: { ping(p: PeerId, o?: { signal?: AbortSignal }): Promise<number> }
    }
    if (services.ping === undefined) throw new NodeStateError('ping service missing')
    const signal = options.signal ?? AbortSignal.timeout(this.timing.requestTimeoutMs)
    // Make sure a dial has the hinted and circuit fallback addresses.
    await this.addDialAddrs(peer)
    const rtt = await services.ping.ping(peerIdFromString(peer), { signal })
    const st = this.peers.get(peer)
    if (st !== undefined) st.rttMs = rtt
    return rtt
  }
}
