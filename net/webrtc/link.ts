/**
 * A `Link` over one werift RTCPeerConnection.
 *
 * - Channels are pre-negotiated (`negotiated: true, id`): both ends create the same fixed set, so no
 *   DCEP round trip and no ordering race between "channel opened" and the first message.
 * - Backpressure: werift's `bufferedAmount` and `bufferedamountlow` event become send(): boolean and
 *   onDrain(), with a high/low water mark per channel.
 * - Liveness: a private heartbeat channel (not in CHANNELS) carries ping/pong every second; any
 *   message received on any channel counts as a sign of life. Nothing heard for `deadAfterMs`
 *   (default 4.5 s, checked every 250 ms, so a dead link is closed within 5 s) closes the link with
 *   LinkDeadError. werift's own ICE consent check would take 30 s (and is switched off: see
 *   relaxConsent).
 * - UDP socket buffers are raised (DESIGN.md: the 208 KiB default drops thousands of packets per run).
 */

import { randomBytes } from 'node:crypto'
import type { Socket } from 'node:dgram'
import { type RTCDataChannel, RTCPeerConnection } from 'werift'
import { AbortError, throwIfAborted } from '../../src/base/errors.ts'
import { ChannelBase, Listeners } from '../link/channel-base.ts'
import { ChannelClosedError, MessageTooLargeError } from '../link/errors.ts'
import {
  CHANNEL_NAMES,
  CHANNELS,
  type ChannelName,
  type Link,
  type LinkState,
  MAX_MESSAGE_SIZE,
  type MessageChannel,
  type PathInfo,
  type PathType,
} from '../link/interfaces.ts'
import { LinkClosedByPeerError, LinkConnectError, LinkDeadError } from './errors.ts'
import type { IceServer, Signaling } from './interfaces.ts'
import type { SignalMessage } from './v1/messages.ts'

/** SCTP stream id of the private heartbeat channel (well above the CHANNELS ids). */
const HEARTBEAT_ID = 100
const HB_PING = 1
const HB_PONG = 2
const HB_BYE = 3

export interface WebRtcLinkOptions {
  /** The remote member's id (string PeerId). */
  peer: string
  /** The initiator creates the offer; exactly one end of a pair must be the initiator. */
  initiator: boolean
  signaling: Signaling
  /** STUN/TURN servers. Default: none (host candidates only). werift's own default (a public Google
   *  STUN server) is never used. */
  iceServers?: IceServer[]
  /** Extra local addresses to offer as host candidates (e.g. 127.0.0.1, which werift skips). */
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
  /** UDP socket send/receive buffer size (default 4 MiB; the kernel caps it at net.core.[rw]mem_max). */
  udpBufferBytes?: number
  signal?: AbortSignal
}

/**
 * werift keeps every message handed to dc.send() as one pending promise that waits on a shared
 * "flush" event, and each of those waiters re-subscribes with an O(n) filter: n queued messages cost
 * O(n²) per flush (measured: 600 messages of 1.5 KB took 4-10 s on loopback). So each channel keeps
 * its own queue and hands werift only a small window; the window refills when werift's
 * bufferedAmount for the channel falls back to zero (it drops in bursts, when SCTP's outbound queue
 * empties).
 */
const WERIFT_WINDOW_BYTES = 1024 * 1024
const WERIFT_WINDOW_MESSAGES = 64

class WebRtcChannel extends ChannelBase {
  readonly reliable: boolean
  private readonly queue: (Buffer | string)[] = []
  private queuedBytes = 0
  /** Sizes of the messages handed to werift and not yet sent, oldest first. */
  private readonly handed: number[] = []
  private handedBytes = 0

  constructor(
    readonly name: ChannelName,
    private readonly dc: RTCDataChannel,
    private readonly highWaterMark: number,
    protected readonly lowWaterMark: number,
    onActivity: () => void,
  ) {
    super()
    this.reliable = CHANNELS[name].reliable
    dc.bufferedAmountLowThreshold = 0
    dc.bufferedAmountLow.subscribe(() => this.pump())
    dc.onMessage.subscribe((data) => {
      onActivity()
      if (this.state !== 'open') return
      // Strings are never sent except as the marker of an empty message (see send()).
      if (typeof data === 'string') this.messageListeners.emit(new Uint8Array(0))
      else this.messageListeners.emit(new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
    })
  }

  get bufferedAmount(): number {
    return this.state === 'open' ? this.queuedBytes + this.dc.bufferedAmount : 0
  }

  send(message: Uint8Array): boolean {
    if (this.state === 'closed') throw new ChannelClosedError(`channel '${this.name}' is closed`)
    if (message.byteLength > MAX_MESSAGE_SIZE)
      throw new MessageTooLargeError(message.byteLength, MAX_MESSAGE_SIZE)
    if (!this.reliable && this.bufferedAmount + message.byteLength > this.highWaterMark) return false
    // Copy: the caller may reuse its buffer once send() returns. werift turns an empty binary message
    // into zero SCTP chunks while still consuming a stream sequence number, which stalls an ordered
    // stream for good; a one-character string (its own PPID) stands for "empty" instead.
    this.queue.push(message.byteLength === 0 ? '\0' : Buffer.from(message))
    this.queuedBytes += message.byteLength
    this.pump()
    return this.bufferedAmount < this.highWaterMark
  }

  /** Moves queued messages into werift while its window has room; signals drain. */
  private pump(): void {
    if (this.state !== 'open') return
    // Forget what werift has sent: its bufferedAmount shrinks by whole messages, oldest first.
    const pending = this.dc.bufferedAmount
    while (this.handedBytes > pending && this.handed.length > 0) this.handedBytes -= this.handed.shift()!
    while (
      this.queue.length > 0 &&
      this.handedBytes < WERIFT_WINDOW_BYTES &&
      this.handed.length < WERIFT_WINDOW_MESSAGES
    ) {
      const m = this.queue.shift()!
      const size = typeof m === 'string' ? 0 : m.byteLength
      this.queuedBytes -= size
      try {
        this.dc.send(m)
      } catch (err) {
        this.close(new ChannelClosedError(`channel '${this.name}' send failed`, { cause: err }))
        return
      }
      const accounted = typeof m === 'string' ? 1 : size
      this.handed.push(accounted)
      this.handedBytes += accounted
    }
    if (this.bufferedAmount <= this.lowWaterMark) this.drainListeners.emit()
  }

  close(reason?: Error): void {
    if (this.state === 'closed') return
    this.state = 'closed'
    this.queue.length = 0
    this.queuedBytes = 0
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    this.messageListeners.clear()
    this.drainListeners.clear()
    this.dc.bufferedAmountLow.allUnsubscribe()
    this.dc.onMessage.allUnsubscribe()
  }
}

/** The concrete link; `closed` resolves once the peer connection and its sockets are released. */
export class WebRtcLink implements Link {
  state: LinkState = 'open'
  path: PathInfo = { type: 'host' }
  /** Round-trip time of the last heartbeat, in ms (undefined until the first pong). */
  rttMs: number | undefined
  /** How long connecting took (signaling start → all channels open), in ms. */
  setupMs = 0
  readonly closed: Promise<void>
  private resolveClosed!: () => void
  private readonly channels = new Map<ChannelName, WebRtcChannel>()
  private readonly closeListeners = new Listeners<[Error | undefined]>()
  private lastHeard = Date.now()
  private heartbeatTimer: NodeJS.Timeout | undefined
  private pingSeq = 0
  private lastPing = 0
  private readonly pingsSent = new Map<number, number>()

  constructor(
    readonly peer: string,
    readonly session: string,
    private readonly pc: RTCPeerConnection,
    dcs: Map<ChannelName, RTCDataChannel>,
    private readonly heartbeat: RTCDataChannel,
    private readonly opts: Required<Pick<WebRtcLinkOptions, 'heartbeatMs' | 'deadAfterMs'>> & {
      highWaterMark: number
      lowWaterMark: number
    },
  ) {
    this.closed = new Promise((r) => {
      this.resolveClosed = r
    })
    const alive = () => {
      this.lastHeard = Date.now()
    }
    for (const name of CHANNEL_NAMES) {
      this.channels.set(
        name,
        new WebRtcChannel(name, dcs.get(name)!, opts.highWaterMark, opts.lowWaterMark, alive),
      )
    }
    heartbeat.onMessage.subscribe((data) => {
      alive()
      if (typeof data === 'string' || data.byteLength < 1) return
      this.onHeartbeat(data)
    })
    pc.connectionStateChange.subscribe((s) => {
      if (s === 'failed') this.close(new LinkDeadError(`link to ${peer}: connection failed`))
      else if (s === 'closed') this.close(new LinkDeadError(`link to ${peer}: connection closed`))
    })
    for (const dc of [...dcs.values(), heartbeat]) {
      dc.stateChanged.subscribe((s) => {
        if (s === 'closed') this.close(new LinkDeadError(`link to ${peer}: data channel closed`))
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
    // Tell the peer at once (best effort) so it need not wait for its dead timer.
    const sayBye =
      reason === undefined || !(reason instanceof LinkDeadError || reason instanceof LinkClosedByPeerError)
    if (sayBye) this.sendHeartbeat(HB_BYE, 0)
    for (const ch of this.channels.values()) ch.close(reason)
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    this.heartbeat.onMessage.allUnsubscribe()
    // Let the bye leave before tearing down DTLS/SCTP (a few ms on any path).
    const delay = sayBye ? 50 : 0
    setTimeout(() => {
      this.pc
        .close()
        .catch(() => {})
        .finally(() => this.resolveClosed())
    }, delay)
  }

  private tick(): void {
    if (this.state !== 'open') return
    const silentMs = Date.now() - this.lastHeard
    if (silentMs > this.opts.deadAfterMs) {
      this.close(new LinkDeadError(`link to ${this.peer}: nothing heard for ${silentMs} ms`))
      return
    }
    const now = performance.now()
    if (now - this.lastPing < this.opts.heartbeatMs) return
    this.lastPing = now
    this.pingSeq = (this.pingSeq + 1) >>> 0
    const seq = this.pingSeq
    this.pingsSent.set(seq, performance.now())
    if (this.pingsSent.size > 16) this.pingsSent.delete(this.pingsSent.keys().next().value!)
    this.sendHeartbeat(HB_PING, seq)
  }

  private onHeartbeat(data: Buffer): void {
    const kind = data[0]
    const seq = data.byteLength >= 5 ? data.readUInt32BE(1) : 0
    if (kind === HB_PING) this.sendHeartbeat(HB_PONG, seq)
    else if (kind === HB_PONG) {
      const t = this.pingsSent.get(seq)
      if (t !== undefined) {
        this.rttMs = performance.now() - t
        this.pingsSent.delete(seq)
      }
    } else if (kind === HB_BYE) this.close(new LinkClosedByPeerError(`link to ${this.peer}: peer closed it`))
  }

  private sendHeartbeat(kind: number, seq: number): void {
    if (this.heartbeat.readyState !== 'open') return
    const b = Buffer.allocUnsafe(5)
    b[0] = kind
    b.writeUInt32BE(seq, 1)
    try {
      this.heartbeat.send(b)
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

interface CandidateLike {
  candidate?: string
}

/** Parses `candidate:<f> <c> <proto> <prio> <ip> <port> typ <type> ...` (RFC 8839). */
function parseCandidate(c: CandidateLike | undefined): { type: string; addr: string } {
  const f = (c?.candidate ?? '').replace(/^candidate:/, '').split(' ')
  return { type: f[7] ?? 'host', addr: `${f[4] ?? '?'}:${f[5] ?? '?'}` }
}

const PATH_RANK: Record<PathType, number> = { memory: -1, host: 0, prflx: 1, srflx: 2, relay: 3 }

function candidateType(c: CandidateLike | undefined): PathType {
  const t = parseCandidate(c).type
  return t === 'srflx' || t === 'prflx' || t === 'relay' ? t : 'host'
}

/** The selected pair's most indirect candidate type: relay if either end relays, and so on. */
export function selectedPath(pc: RTCPeerConnection): PathInfo {
  const pair = pc.iceTransports[0]?.getSelectedCandidatePair() as
    | { local: CandidateLike; remote: CandidateLike }
    | null
    | undefined
  if (pair == null) return { type: 'host' }
  const lt = candidateType(pair.local)
  const rt = candidateType(pair.remote)
  const addr = (c: CandidateLike) => parseCandidate(c).addr
  return {
    type: PATH_RANK[lt] >= PATH_RANK[rt] ? lt : rt,
    local: `${lt} ${addr(pair.local)}`,
    remote: `${rt} ${addr(pair.remote)}`,
  }
}

interface SocketOwner {
  transport?: { socket?: Socket }
  turn?: { transport?: { socket?: Socket } }
}

/** Raises the buffers of every UDP socket the peer connection's ICE agent opened. werift has no
 *  option for it; its ICE connection keeps the sockets in `protocols` (one per host address, plus the
 *  TURN client's). Setting buffers is an optimisation: any failure here is ignored. */
export function enlargeUdpBuffers(pc: RTCPeerConnection, bytes: number): number {
  let n = 0
  for (const t of pc.iceTransports) {
    const protocols = (t.connection as unknown as { protocols?: SocketOwner[] }).protocols ?? []
    for (const p of protocols) {
      for (const s of [p.transport?.socket, p.turn?.transport?.socket]) {
        if (s === undefined || typeof s.setRecvBufferSize !== 'function') continue
        try {
          s.setRecvBufferSize(bytes)
          s.setSendBufferSize(bytes)
          n++
        } catch {
          // Not bound yet, or closed: keep the default.
        }
      }
    }
  }
  return n
}

/**
 * Turns off werift's RFC 7675 consent expiry on an established connection. Measured: while a busy
 * process moves bulk data, consent responses wait behind megabytes of queued datagrams and miss
 * werift's 0.5-1 s response timeout; after 30 s of that ICE goes 'failed' and werift stops sending,
 * killing a healthy link mid-transfer. The link's own heartbeat (ping/pong, dead after 5 s, any
 * received message counts) replaces it: it notices a dead path faster, keeps NAT bindings warm, and a
 * peer that stops answering is dropped within deadAfterMs as consent would. Touches werift internals,
 * so it checks their shape and does nothing if they changed.
 */
export function relaxConsent(pc: RTCPeerConnection): boolean {
  let done = false
  for (const t of pc.iceTransports) {
    const c = t.connection as unknown as {
      stopConsentLifecycle?: () => void
      queryConsent?: () => void
      consentFresh?: boolean
    }
    if (typeof c.stopConsentLifecycle !== 'function' || typeof c.queryConsent !== 'function') continue
    c.stopConsentLifecycle()
    c.queryConsent = () => {}
    c.consentFresh = true
    done = true
  }
  return done
}

function waitGatheringComplete(pc: RTCPeerConnection, signal: AbortSignal): Promise<void> {
  if (pc.iceGatheringState === 'complete') return Promise.resolve()
  return new Promise((resolve, reject) => {
    const sub = pc.iceGatheringStateChange.subscribe((s) => {
      if (s === 'complete') {
        done()
        resolve()
      }
    })
    const onAbort = () => {
      done()
      reject(signal.reason)
    }
    const done = () => {
      sub.unSubscribe()
      signal.removeEventListener('abort', onAbort)
    }
    signal.addEventListener('abort', onAbort, { once: true })
  })
}

function waitOpen(dc: RTCDataChannel, signal: AbortSignal): Promise<void> {
  if (dc.readyState === 'open') return Promise.resolve()
  return new Promise((resolve, reject) => {
    const sub = dc.stateChanged.subscribe((s) => {
      if (s === 'open') {
        done()
        resolve()
      } else if (s === 'closed') {
        done()
        reject(new LinkConnectError(`data channel ${dc.label} closed while connecting`))
      }
    })
    const onAbort = () => {
      done()
      reject(signal.reason)
    }
    const done = () => {
      sub.unSubscribe()
      signal.removeEventListener('abort', onAbort)
    }
    signal.addEventListener('abort', onAbort, { once: true })
  })
}

/** Creates the fixed channel set, pre-negotiated. The tunnel channel asks for no retransmissions
 *  (maxRetransmits: 0); stock werift 0.24.4 ignores that and can hang when abandoning, which
 *  patches/werift+0.24.4.patch (applied by patch-package at npm install) fixes; proven by
 *  test/system/webrtc-unreliable.test.ts. */
function createChannels(pc: RTCPeerConnection): {
  dcs: Map<ChannelName, RTCDataChannel>
  heartbeat: RTCDataChannel
} {
  const dcs = new Map<ChannelName, RTCDataChannel>()
  for (const name of CHANNEL_NAMES) {
    const spec = CHANNELS[name]
    dcs.set(
      name,
      pc.createDataChannel(name, {
        negotiated: true,
        id: spec.id,
        ordered: spec.ordered,
        ...(spec.reliable ? {} : { maxRetransmits: 0 }),
      }),
    )
  }
  const heartbeat = pc.createDataChannel('heartbeat', { negotiated: true, id: HEARTBEAT_ID, ordered: true })
  return { dcs, heartbeat }
}

/**
 * Builds a link to `peer`: exchanges offer/answer through `signaling` (candidates are gathered first
 * and travel inside the SDP), waits for ICE, DTLS and SCTP, and resolves once every channel is open.
 * Rejects with LinkConnectError (timeout, failure, peer bye) or AbortError; nothing is left open then.
 */
export async function createWebRtcLink(options: WebRtcLinkOptions): Promise<WebRtcLink> {
  throwIfAborted(options.signal)
  const started = performance.now()
  const connectTimeoutMs = options.connectTimeoutMs ?? 30_000
  const highWaterMark = options.highWaterMark ?? 1024 * 1024
  const lowWaterMark = options.lowWaterMark ?? 256 * 1024
  const ctl = new AbortController()
  const timeout = setTimeout(
    () =>
      ctl.abort(new LinkConnectError(`link to ${options.peer}: not connected after ${connectTimeoutMs} ms`)),
    connectTimeoutMs,
  )
  const onOuterAbort = () => ctl.abort(new AbortError(undefined, { cause: options.signal?.reason }))
  options.signal?.addEventListener('abort', onOuterAbort, { once: true })

  const pc = new RTCPeerConnection({
    iceServers: (options.iceServers ?? []).map((s) => ({ ...s })),
    iceTransportPolicy: options.iceTransportPolicy ?? 'all',
    iceUseIpv6: false,
    ...(options.iceAdditionalHostAddresses
      ? { iceAdditionalHostAddresses: options.iceAdditionalHostAddresses }
      : {}),
    ...(options.iceInterfaceAddress ? { iceInterfaceAddresses: { udp4: options.iceInterfaceAddress } } : {}),
    ...(options.portRange ? { icePortRange: options.portRange } : {}),
    // Advertise what the link layer promises; SCTP fragments into 1200-byte chunks underneath.
    maxMessageSize: MAX_MESSAGE_SIZE + 1024,
  })
  const { dcs, heartbeat } = createChannels(pc)

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
        const onAbort = () => reject(ctl.signal.reason)
        if (ctl.signal.aborted) return onAbort()
        wake = () => {
          wake = undefined
          ctl.signal.removeEventListener('abort', onAbort)
          resolve()
        }
        ctl.signal.addEventListener('abort', onAbort, { once: true })
      })
    }
  }
  const applyCandidates = async () => {
    // Trickled candidates (from a peer that sends them separately) are applied after the remote SDP.
    for (const m of queued.splice(0)) {
      if (m.type === 'candidate')
        await pc
          .addIceCandidate({ candidate: m.candidate, sdpMid: m.sdpMid, sdpMLineIndex: m.sdpMLineIndex })
          .catch(() => {})
    }
  }

  try {
    if (options.initiator) {
      await pc.setLocalDescription(await pc.createOffer())
      await waitGatheringComplete(pc, ctl.signal)
      enlargeUdpBuffers(pc, options.udpBufferBytes ?? 4 * 1024 * 1024)
      options.signaling.send({ v: 1, session, type: 'offer', sdp: pc.localDescription!.sdp })
      const answer = await next('answer')
      await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp })
    } else {
      const offer = await next('offer')
      session = offer.session
      for (let i = queued.length - 1; i >= 0; i--) if (queued[i]!.session !== session) queued.splice(i, 1)
      await pc.setRemoteDescription({ type: 'offer', sdp: offer.sdp })
      await pc.setLocalDescription(await pc.createAnswer())
      await waitGatheringComplete(pc, ctl.signal)
      enlargeUdpBuffers(pc, options.udpBufferBytes ?? 4 * 1024 * 1024)
      options.signaling.send({ v: 1, session, type: 'answer', sdp: pc.localDescription!.sdp })
    }
    await applyCandidates()
    const failed = new Promise<never>((_, reject) => {
      const sub = pc.connectionStateChange.subscribe((s) => {
        if (s === 'failed' || s === 'closed') {
          sub.unSubscribe()
          reject(new LinkConnectError(`link to ${options.peer}: connection ${s}`))
        }
      })
      ctl.signal.addEventListener('abort', () => sub.unSubscribe(), { once: true })
    })
    failed.catch(() => {})
    await Promise.race([
      Promise.all([...dcs.values(), heartbeat].map((dc) => waitOpen(dc, ctl.signal))),
      failed,
    ])
    const link = new WebRtcLink(options.peer, session, pc, dcs, heartbeat, {
      heartbeatMs: options.heartbeatMs ?? 1000,
      deadAfterMs: options.deadAfterMs ?? 4500,
      highWaterMark,
      lowWaterMark,
    })
    relaxConsent(pc)
    link.path = selectedPath(pc)
    link.setupMs = performance.now() - started
    const outer = options.signal
    if (outer !== undefined) {
      // The caller's signal bounds the link's whole life, not only the connect.
      const onAbort = () => link.close(new AbortError('link aborted', { cause: outer.reason }))
      outer.addEventListener('abort', onAbort, { once: true })
      link.onClose(() => outer.removeEventListener('abort', onAbort))
    }
    return link
  } catch (err) {
    if (session !== '') options.signaling.send({ v: 1, session, type: 'bye', reason: 'connect failed' })
    await pc.close().catch(() => {})
    if (err instanceof AbortError || err instanceof LinkConnectError) throw err
    throw new LinkConnectError(
      `link to ${options.peer}: ${err instanceof Error ? err.message : String(err)}`,
      {
        cause: err,
      },
    )
  } finally {
    ctl.abort() // releases the helper listeners above
    clearTimeout(timeout)
    options.signal?.removeEventListener('abort', onOuterAbort)
    offSignal()
  }
}
