/**
 * The WebRTC `Link`: one implementation over any engine (./engine.ts; werift by default, libdatachannel
 * on request). Both ends may run different engines: they speak the same protocol.
 *
 * - Signaling: offer/answer through `Signaling` (v1/messages.ts), every gathered candidate inside the
 *   SDP (candidates trickled separately are applied too); `session` names one attempt, `bye` refuses.
 * - Channels are pre-negotiated (`negotiated: true, id`): both ends create the same fixed set, so no
 *   DCEP round trip and no ordering race between "channel opened" and the first message. The tunnel
 *   channel is unordered with maxRetransmits 0.
 * - Backpressure: the engine's bufferedAmount becomes send(): boolean above a high-water mark and
 *   onDrain() at a low-water mark, per channel.
 * - An empty message travels as the one-character string "\0": werift turns an empty binary message
 *   into zero SCTP chunks while still consuming a stream sequence number, which stalls an ordered
 *   stream for good. Any string received stands for "empty".
 * - Liveness: a private heartbeat channel (v1/heartbeat.ts, not in CHANNELS) carries ping/pong every
 *   second; any message received on any channel counts as a sign of life. Nothing heard for
 *   `deadAfterMs` (default 4.5 s, checked every 250 ms, so a dead link is closed within 5 s) closes the
 *   link with LinkDeadError. A close on purpose sends bye, so the peer need not wait for that.
 * - One ping round per second, not two: the initiating end pings every `heartbeatMs`; the answering end
 *   answers each ping (its pong is its sign of life) and pings only every `ANSWERER_PING_EVERY`
 *   heartbeats, for its own RTT. Each end still hears the other every second. Measured (bench scale, 12
 *   agents, 10 links each, idle): ~80 % of an idle agent's CPU was heartbeat packets (4 datagrams per
 *   ping round with the SACKs, each through DTLS and a UDP syscall); this halves them. An older peer
 *   pings every second at either end, as before, and is answered.
 */

import { randomBytes } from 'node:crypto'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError, throwIfAborted } from '../../src/base/errors.ts'
import type { LinkFactory } from '../interfaces.ts'
import { ChannelBase, Listeners } from '../link/channel-base.ts'
import { ChannelClosedError, MessageTooLargeError } from '../link/errors.ts'
import {
  CHANNEL_NAMES,
  CHANNELS,
  type ChannelName,
  type ChannelState,
  type Link,
  type LinkState,
  MAX_MESSAGE_SIZE,
  type MessageChannel,
  type PathInfo,
} from '../link/interfaces.ts'
import type {
  CongestionControl,
  EngineChannel,
  EngineChannelSpec,
  EngineConnection,
  LinkEngine,
} from './engine.ts'
import { loadEngine } from './engines.ts'
import { LinkClosedByPeerError, LinkConnectError, LinkDeadError } from './errors.ts'
import type { IceServer, Signaling } from './interfaces.ts'
import { decodeHeartbeat, encodeHeartbeat, HEARTBEAT_CHANNEL_ID, type HeartbeatKind } from './v1/heartbeat.ts'
import type { SignalMessage } from './v1/messages.ts'

export type { LinkEngine } from './engine.ts'

export interface WebRtcLinkOptions {
  /** The remote member's id (string PeerId). */
  peer: string
  /** The initiator creates the offer; exactly one end of a pair must be the initiator. */
  initiator: boolean
  signaling: Signaling
  /** Which WebRTC implementation carries this end (default werift). */
  engine?: LinkEngine
  /** STUN/TURN servers. Default: none (host candidates only). werift's own default (a public Google
   *  STUN server) is never used. */
  iceServers?: IceServer[]
  /** Extra local addresses to offer as host candidates (e.g. 127.0.0.1, which werift skips;
   *  libdatachannel gathers every interface address itself). */
  iceAdditionalHostAddresses?: string[]
  /** Bind ICE sockets to this IPv4 address only. */
  iceInterfaceAddress?: string
  /** Use only relayed candidates (tests: force TURN). */
  iceTransportPolicy?: 'all' | 'relay'
  portRange?: [number, number]
  /** Gives up connecting after this long (default 30 s). */
  connectTimeoutMs?: number
  /** Heartbeat period (default 1000 ms). */
  heartbeatMs?: number
  /** Closes the link with LinkDeadError when nothing was heard for this long (default 4500 ms). */
  deadAfterMs?: number
  /** send() returns false above this many buffered bytes per channel (default 1 MiB). */
  highWaterMark?: number
  /** onDrain() resolves at or below this (default 256 KiB). */
  lowWaterMark?: number
  /** UDP socket send/receive buffer size (werift; default 4 MiB; the kernel caps it at
   *  net.core.[rw]mem_max). libdatachannel sizes its own sockets. */
  udpBufferBytes?: number
  /** SCTP congestion control of a werift end (default 'tolerant'; see CongestionControl). */
  congestionControl?: CongestionControl
  signal?: AbortSignal
}

const EMPTY_MARKER = '\0'

/** The answering end pings once per this many heartbeats (for its RTT); the initiator pings each one. */
export const ANSWERER_PING_EVERY = 5

/** The fixed channel set plus the heartbeat channel, in this order. */
export const LINK_CHANNEL_SPECS: readonly EngineChannelSpec[] = [
  ...CHANNEL_NAMES.map((name) => ({
    label: name,
    id: CHANNELS[name].id,
    ordered: CHANNELS[name].ordered,
    ...(CHANNELS[name].reliable ? {} : { maxRetransmits: 0 }),
  })),
  { label: 'heartbeat', id: HEARTBEAT_CHANNEL_ID, ordered: true },
]

class WebRtcChannel extends ChannelBase {
  readonly reliable: boolean

  constructor(
    readonly name: ChannelName,
    private readonly dc: EngineChannel,
    private readonly highWaterMark: number,
    protected readonly lowWaterMark: number,
    onActivity: () => void,
  ) {
    super()
    this.reliable = CHANNELS[name].reliable
    // The engine's callback may come late (libdatachannel's crosses threads): drained() re-checks.
    dc.onLow(lowWaterMark, () => this.drained())
    dc.onMessage((data) => {
      onActivity()
      if (this.state !== 'open') return
      this.messageListeners.emit(typeof data === 'string' ? new Uint8Array(0) : data)
    })
    dc.onClose((sendFailure) => {
      if (sendFailure !== undefined)
        this.close(new ChannelClosedError(`channel '${this.name}' send failed`, { cause: sendFailure }))
    })
  }

  get bufferedAmount(): number {
    return this.state === 'open' ? this.dc.bufferedAmount : 0
  }

  send(message: Uint8Array): boolean {
    if (this.state === 'closed') throw new ChannelClosedError(`channel '${this.name}' is closed`)
    if (message.byteLength > MAX_MESSAGE_SIZE)
      throw new MessageTooLargeError(message.byteLength, MAX_MESSAGE_SIZE)
    const before = this.bufferedAmount
    if (!this.reliable && before + message.byteLength > this.highWaterMark) return false
    try {
      this.dc.send(message.byteLength === 0 ? EMPTY_MARKER : message)
    } catch (err) {
      const e = new ChannelClosedError(`channel '${this.name}' send failed`, { cause: err })
      this.close(e)
      throw e
    }
    // The engine may have failed to hand it over synchronously and closed the channel (see dc.onClose).
    if ((this.state as ChannelState) === 'closed')
      throw new ChannelClosedError(`channel '${this.name}' send failed`)
    return before + message.byteLength < this.highWaterMark
  }

  close(reason?: Error): void {
    if (this.markClosed(reason)) this.dc.release()
  }
}

/** The concrete link; `closed` resolves once the peer connection and its sockets are released. */
export class WebRtcLink implements Link {
  readonly engine: LinkEngine
  state: LinkState = 'open'
  path: PathInfo = { type: 'host' }
  /** Round-trip time of the last heartbeat, in ms (undefined until the first pong). */
  rttMs: number | undefined
  /** How long connecting took (signaling start → all channels open), in ms. */
  setupMs = 0
  readonly closed: Promise<void>
  private resolveClosed!: () => void
  private readonly channels = new Map<ChannelName, WebRtcChannel>()
  private readonly heartbeat: EngineChannel
  private readonly closeListeners = new Listeners<[Error | undefined]>()
  private readonly offConnection: () => void
  private lastHeard = Date.now()
  private heartbeatTimer: NodeJS.Timeout | undefined
  private pingSeq = 0
  private lastPing = Number.NEGATIVE_INFINITY
  private readonly pingEveryMs: number
  private readonly pingsSent = new Map<number, number>()

  constructor(
    readonly peer: string,
    readonly session: string,
    /** The engine's peer connection (tests reach its internals). */
    readonly connection: EngineConnection,
    private readonly opts: {
      heartbeatMs: number
      deadAfterMs: number
      highWaterMark: number
      lowWaterMark: number
      /** The end that created the offer pings every heartbeat; the other every ANSWERER_PING_EVERY
       *  (default true: both ends every heartbeat, as before). */
      initiator?: boolean
    },
  ) {
    this.engine = connection.engine
    this.pingEveryMs = opts.initiator === false ? opts.heartbeatMs * ANSWERER_PING_EVERY : opts.heartbeatMs
    this.closed = new Promise((r) => {
      this.resolveClosed = r
    })
    const alive = () => {
      this.lastHeard = Date.now()
    }
    const dcs = connection.channels
    CHANNEL_NAMES.forEach((name, i) => {
      this.channels.set(name, new WebRtcChannel(name, dcs[i]!, opts.highWaterMark, opts.lowWaterMark, alive))
    })
    this.heartbeat = dcs[CHANNEL_NAMES.length]!
    this.heartbeat.onMessage((data) => {
      alive()
      if (typeof data !== 'string') this.onHeartbeat(data)
    })
    this.offConnection = connection.onStateChange((s) =>
      this.close(new LinkDeadError(`link to ${peer}: connection ${s}`)),
    )
    for (const dc of dcs) {
      dc.onClose((sendFailure) => {
        if (sendFailure === undefined) this.close(new LinkDeadError(`link to ${peer}: data channel closed`))
      })
    }
    this.heartbeatTimer = setInterval(() => this.tick(), Math.min(250, opts.heartbeatMs))
  }

  /** Milliseconds since anything was last received from the peer. */
  get silentMs(): number {
    return Date.now() - this.lastHeard
  }

  channel(name: ChannelName): MessageChannel {
    const ch = this.channels.get(name)
    if (ch === undefined) throw new TypeError(`unknown channel '${name}'`)
    return ch
  }

  onClose(handler: (reason?: Error) => void): () => void {
    if (this.state === 'closed') {
      queueMicrotask(() => handler())
      return () => {}
    }
    return this.closeListeners.add(handler)
  }

  close(reason?: Error): void {
    if (this.state === 'closed') return
    this.state = 'closed'
    clearInterval(this.heartbeatTimer)
    this.heartbeatTimer = undefined
    this.offConnection()
    // Tell the peer at once (best effort) so it need not wait for its dead timer.
    const sayBye =
      reason === undefined || !(reason instanceof LinkDeadError || reason instanceof LinkClosedByPeerError)
    if (sayBye) this.sendHeartbeat('bye', 0)
    for (const ch of this.channels.values()) ch.close(reason)
    this.heartbeat.release()
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    // Let the bye leave before tearing down DTLS/SCTP (a few ms on any path).
    setTimeout(
      () => {
        this.connection.close().finally(() => this.resolveClosed())
      },
      sayBye ? 50 : 0,
    )
  }

  private tick(): void {
    if (this.state !== 'open') return
    const silentMs = Date.now() - this.lastHeard
    if (silentMs > this.opts.deadAfterMs) {
      this.close(new LinkDeadError(`link to ${this.peer}: nothing heard for ${silentMs} ms`))
      return
    }
    const now = performance.now()
    if (now - this.lastPing < this.pingEveryMs) return
    this.lastPing = now
    this.pingSeq = (this.pingSeq + 1) >>> 0
    const seq = this.pingSeq
    this.pingsSent.set(seq, performance.now())
    if (this.pingsSent.size > 16) this.pingsSent.delete(this.pingsSent.keys().next().value!)
    this.sendHeartbeat('ping', seq)
  }

  private onHeartbeat(data: Uint8Array): void {
    if (this.state !== 'open') return
    let hb: ReturnType<typeof decodeHeartbeat>
    try {
      hb = decodeHeartbeat(data)
    } catch {
      return // A later version's message, or garbage: it counted as a sign of life, nothing more.
    }
    if (hb.kind === 'ping') this.sendHeartbeat('pong', hb.seq)
    else if (hb.kind === 'pong') {
      const t = this.pingsSent.get(hb.seq)
      if (t !== undefined) {
        this.rttMs = performance.now() - t
        this.pingsSent.delete(hb.seq)
      }
    } else this.close(new LinkClosedByPeerError(`link to ${this.peer}: peer closed it`))
  }

  private sendHeartbeat(kind: HeartbeatKind, seq: number): void {
    if (!this.heartbeat.isOpen) return
    try {
      this.heartbeat.send(encodeHeartbeat({ kind, seq }))
    } catch {
      // The transport is going away; the dead timer or the state change will close the link.
    }
  }

  /** Releases everything and waits until it is released (tests, shutdown). */
  async destroy(reason?: Error): Promise<void> {
    this.close(reason)
    await this.closed
  }
}

function waitOpen(dc: EngineChannel, signal: AbortSignal): Promise<void> {
  if (dc.isOpen) return Promise.resolve()
  return new Promise((resolve, reject) => {
    const done = () => {
      offOpen()
      offClose()
      offAbort()
    }
    const offOpen = dc.onOpen(() => {
      done()
      resolve()
    })
    const offClose = dc.onClose(() => {
      done()
      reject(new LinkConnectError(`data channel ${dc.label} closed while connecting`))
    })
    const offAbort = onAbort(signal, (reason) => {
      done()
      reject(reason)
    })
    // It may have opened between the check above and the subscription.
    if (dc.isOpen) {
      done()
      resolve()
    }
  })
}

/**
 * Builds a link to `peer`: exchanges offer/answer through `signaling`, waits for ICE, DTLS and SCTP,
 * and resolves once every channel is open. Rejects with LinkConnectError (timeout, failure, peer bye)
 * or AbortError; nothing is left open then.
 */
export async function createWebRtcLink(options: WebRtcLinkOptions): Promise<WebRtcLink> {
  throwIfAborted(options.signal)
  const started = performance.now()
  const engineName = options.engine ?? 'werift'
  const connectTimeoutMs = options.connectTimeoutMs ?? 30_000
  const ctl = new AbortController()
  const timeout = setTimeout(
    () =>
      ctl.abort(new LinkConnectError(`link to ${options.peer}: not connected after ${connectTimeoutMs} ms`)),
    connectTimeoutMs,
  )
  const offOuterAbort = onAbort(options.signal, (reason) =>
    ctl.abort(new AbortError(undefined, { cause: reason })),
  )

  // Subscribe before anything is awaited (the engine may still be loading): nothing the peer sends is lost.
  let session = options.initiator ? randomBytes(12).toString('base64url') : ''
  const queued: SignalMessage[] = []
  let wake: (() => void) | undefined
  const offSignal = options.signaling.onMessage((msg) => {
    if (session !== '' && msg.session !== session) return
    queued.push(msg)
    wake?.()
  })
  const next = async (want: 'offer' | 'answer'): Promise<SignalMessage & { sdp: string }> => {
    for (;;) {
      const i = queued.findIndex((m) => m.type === want || m.type === 'bye')
      if (i >= 0) {
        const m = queued.splice(i, 1)[0]!
        if (m.type === 'bye')
          throw new LinkConnectError(`link to ${options.peer}: peer refused (${m.reason ?? 'bye'})`)
        if (m.type === 'offer' || m.type === 'answer') return m
      }
      await new Promise<void>((resolve, reject) => {
        if (ctl.signal.aborted) return reject(ctl.signal.reason)
        const offAbort = onAbort(ctl.signal, reject)
        wake = () => {
          wake = undefined
          offAbort()
          resolve()
        }
      })
    }
  }

  let connection: EngineConnection | undefined
  try {
    const factory = await loadEngine(engineName)
    if (ctl.signal.aborted) throw ctl.signal.reason
    const conn = factory(
      {
        iceServers: options.iceServers ?? [],
        iceTransportPolicy: options.iceTransportPolicy ?? 'all',
        ...(options.iceAdditionalHostAddresses
          ? { iceAdditionalHostAddresses: options.iceAdditionalHostAddresses }
          : {}),
        ...(options.iceInterfaceAddress ? { iceInterfaceAddress: options.iceInterfaceAddress } : {}),
        ...(options.portRange ? { portRange: options.portRange } : {}),
        udpBufferBytes: options.udpBufferBytes ?? 4 * 1024 * 1024,
        // Advertise what the link layer promises; SCTP fragments into 1200-byte chunks underneath.
        maxMessageSize: MAX_MESSAGE_SIZE + 1024,
        congestionControl: options.congestionControl ?? 'tolerant',
      },
      LINK_CHANNEL_SPECS,
    )
    connection = conn
    if (options.initiator) {
      const sdp = await conn.createOffer(ctl.signal)
      options.signaling.send({ v: 1, session, type: 'offer', sdp })
      const answer = await next('answer')
      await conn.acceptAnswer(answer.sdp)
    } else {
      const offer = await next('offer')
      session = offer.session
      for (let i = queued.length - 1; i >= 0; i--) if (queued[i]!.session !== session) queued.splice(i, 1)
      const sdp = await conn.createAnswer(offer.sdp, ctl.signal)
      options.signaling.send({ v: 1, session, type: 'answer', sdp })
    }
    // Trickled candidates (from a peer that sends them separately) are applied after the remote SDP.
    for (const m of queued.splice(0)) {
      if (m.type === 'candidate') await conn.addRemoteCandidate(m).catch(() => {}) // unusable: not fatal
    }
    let offFailed = () => {}
    const failed = new Promise<never>((_, reject) => {
      offFailed = conn.onStateChange((s) =>
        reject(new LinkConnectError(`link to ${options.peer}: connection ${s}`)),
      )
    })
    failed.catch(() => {})
    try {
      await Promise.race([Promise.all(conn.channels.map((dc) => waitOpen(dc, ctl.signal))), failed])
    } finally {
      offFailed()
    }
    const link = new WebRtcLink(options.peer, session, conn, {
      heartbeatMs: options.heartbeatMs ?? 1000,
      deadAfterMs: options.deadAfterMs ?? 4500,
      highWaterMark: options.highWaterMark ?? 1024 * 1024,
      lowWaterMark: options.lowWaterMark ?? 256 * 1024,
      initiator: options.initiator,
    })
    conn.established()
    link.path = conn.path()
    link.setupMs = performance.now() - started
    const outer = options.signal
    if (outer !== undefined) {
      // The caller's signal bounds the link's whole life, not only the connect.
      const offAbort = onAbort(outer, (reason) =>
        link.close(new AbortError('link aborted', { cause: reason })),
      )
      link.onClose(() => offAbort())
    }
    return link
  } catch (err) {
    if (session !== '') options.signaling.send({ v: 1, session, type: 'bye', reason: 'connect failed' })
    await connection?.close()
    if (err instanceof AbortError || err instanceof LinkConnectError) throw err
    throw new LinkConnectError(
      `link to ${options.peer}: ${err instanceof Error ? err.message : String(err)}`,
      { cause: err },
    )
  } finally {
    ctl.abort() // releases the helper listeners above
    clearTimeout(timeout)
    offOuterAbort()
    offSignal()
  }
}

/** Options shared by every link a node builds (the MeshNodeInit.webrtc shape). */
export type LinkEngineOptions = Omit<
  WebRtcLinkOptions,
  'peer' | 'initiator' | 'signaling' | 'iceServers' | 'signal'
>

/** A LinkFactory for net/node.ts using `engine`, with `opts` applied to every link. */
export function linkFactoryFor(engine: LinkEngine, opts: LinkEngineOptions = {}): LinkFactory {
  return (init) => createWebRtcLink({ ...opts, ...init, engine })
}
