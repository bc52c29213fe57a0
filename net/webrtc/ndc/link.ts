/**
 * A `Link` over one libdatachannel PeerConnection (npm `node-datachannel`, native API, not its W3C
 * polyfill): the second data-plane engine next to werift (../link.ts), measured several times faster
 * (see README/issue 8). It speaks exactly what the werift link speaks, so a werift end and a
 * libdatachannel end form one link:
 *
 * - the same Signaling and v1 messages: offer/answer carry the gathered candidates inside the SDP
 *   (candidates trickled separately are applied too), `session` names the attempt, `bye` refuses;
 * - the same pre-negotiated channels (CHANNELS ids, tunnel unordered with maxRetransmits 0, which
 *   libdatachannel's usrsctp implements as real PR-SCTP) plus the private heartbeat channel, id 100,
 *   whose 5-byte ping/pong/bye messages and dead timer match the werift link's;
 * - an empty message travels as the one-character string "\0" (werift cannot send an empty binary
 *   message; any string received stands for "empty");
 * - max message size: both ends advertise MAX_MESSAGE_SIZE + 1024 in the SDP (libdatachannel's own
 *   default is exactly 256 KiB and it refuses larger sends using the peer's advertised value).
 *
 * Backpressure: libdatachannel copies each message into its own queue at send time, so no JS-side
 * queue is needed: send() returns false above the high-water mark of the native bufferedAmount, and
 * onDrain() waits for libdatachannel's bufferedAmountLow callback at the low-water mark.
 */

import { randomBytes } from 'node:crypto'
import nodeDataChannel from 'node-datachannel'
import { AbortError, throwIfAborted } from '../../../src/base/errors.ts'
import { ChannelBase, Listeners } from '../../link/channel-base.ts'
import { ChannelClosedError, MessageTooLargeError } from '../../link/errors.ts'
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
} from '../../link/interfaces.ts'
import { LinkClosedByPeerError, LinkConnectError, LinkDeadError } from '../errors.ts'
import type { IceServer } from '../interfaces.ts'
import type { WebRtcLinkOptions } from '../link.ts'
import type { SignalMessage } from '../v1/messages.ts'

type PeerConnection = nodeDataChannel.PeerConnection
type DataChannel = nodeDataChannel.DataChannel
const { PeerConnection: NativePeerConnection } = nodeDataChannel

/** SCTP stream id of the private heartbeat channel; must equal the werift link's HEARTBEAT_ID. */
export const HEARTBEAT_ID = 100
const HB_PING = 1
const HB_PONG = 2
const HB_BYE = 3

/** Same options as the werift link. `iceAdditionalHostAddresses` and `udpBufferBytes` are accepted and
 *  ignored: libjuice gathers every interface address itself and sizes its own sockets. */
export type NdcLinkOptions = WebRtcLinkOptions

const EMPTY_MARKER = '\0'

class NdcChannel extends ChannelBase {
  readonly reliable: boolean

  constructor(
    readonly name: ChannelName,
    private readonly dc: DataChannel,
    private readonly highWaterMark: number,
    protected readonly lowWaterMark: number,
    onActivity: () => void,
  ) {
    super()
    this.reliable = CHANNELS[name].reliable
    dc.setBufferedAmountLowThreshold(lowWaterMark)
    dc.onBufferedAmountLow(() => {
      // The callback crosses threads and arrives late: re-check. If more was sent meanwhile, the
      // amount rises above the threshold again and the next crossing calls back again.
      if (this.state === 'open' && this.bufferedAmount <= this.lowWaterMark) this.drainListeners.emit()
    })
    dc.onMessage((data) => {
      onActivity()
      if (this.state !== 'open') return
      if (typeof data === 'string') this.messageListeners.emit(new Uint8Array(0))
      else if (data instanceof ArrayBuffer) this.messageListeners.emit(new Uint8Array(data))
      else this.messageListeners.emit(new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
    })
  }

  get bufferedAmount(): number {
    if (this.state !== 'open') return 0
    try {
      return this.dc.bufferedAmount()
    } catch {
      return 0
    }
  }

  send(message: Uint8Array): boolean {
    if (this.state === 'closed') throw new ChannelClosedError(`channel '${this.name}' is closed`)
    if (message.byteLength > MAX_MESSAGE_SIZE)
      throw new MessageTooLargeError(message.byteLength, MAX_MESSAGE_SIZE)
    const before = this.bufferedAmount
    if (!this.reliable && before + message.byteLength > this.highWaterMark) return false
    try {
      // Both calls copy the bytes into libdatachannel: the caller may reuse its buffer at once.
      if (message.byteLength === 0) this.dc.sendMessage(EMPTY_MARKER)
      else this.dc.sendMessageBinary(message)
    } catch (err) {
      const e = new ChannelClosedError(`channel '${this.name}' send failed`, { cause: err })
      this.close(e)
      throw e
    }
    return before + message.byteLength < this.highWaterMark
  }

  close(reason?: Error): void {
    if (this.state === 'closed') return
    this.state = 'closed'
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    this.messageListeners.clear()
    this.drainListeners.clear()
  }
}

/** The concrete link; `closed` resolves once the peer connection is released. */
export class NdcLink implements Link {
  readonly engine = 'libdatachannel'
  state: LinkState = 'open'
  path: PathInfo = { type: 'host' }
  /** Round-trip time of the last heartbeat, in ms (undefined until the first pong). */
  rttMs: number | undefined
  /** How long connecting took (signaling start → all channels open), in ms. */
  setupMs = 0
  readonly closed: Promise<void>
  private resolveClosed!: () => void
  private readonly channels = new Map<ChannelName, NdcChannel>()
  private readonly closeListeners = new Listeners<[Error | undefined]>()
  private lastHeard = Date.now()
  private heartbeatTimer: NodeJS.Timeout | undefined
  private pingSeq = 0
  private lastPing = 0
  private readonly pingsSent = new Map<number, number>()

  constructor(
    readonly peer: string,
    readonly session: string,
    private readonly pc: PeerConnection,
    dcs: Map<ChannelName, DataChannel>,
    private readonly heartbeat: DataChannel,
    private readonly opts: {
      heartbeatMs: number
      deadAfterMs: number
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
        new NdcChannel(name, dcs.get(name)!, opts.highWaterMark, opts.lowWaterMark, alive),
      )
    }
    heartbeat.onMessage((data) => {
      alive()
      if (typeof data === 'string') return
      const b = data instanceof ArrayBuffer ? Buffer.from(data) : data
      if (b.byteLength >= 1) this.onHeartbeat(b)
    })
    pc.onStateChange((s) => {
      if (s === 'failed') this.close(new LinkDeadError(`link to ${peer}: connection failed`))
      else if (s === 'closed') this.close(new LinkDeadError(`link to ${peer}: connection closed`))
    })
    for (const dc of [...dcs.values(), heartbeat]) {
      dc.onClosed(() => this.close(new LinkDeadError(`link to ${peer}: data channel closed`)))
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
    const sayBye =
      reason === undefined || !(reason instanceof LinkDeadError || reason instanceof LinkClosedByPeerError)
    if (sayBye) this.sendHeartbeat(HB_BYE, 0)
    for (const ch of this.channels.values()) ch.close(reason)
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    // Let the bye leave before tearing down DTLS/SCTP.
    setTimeout(
      () => {
        try {
          this.pc.close()
        } catch {
          // already gone
        }
        this.resolveClosed()
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
    if (now - this.lastPing < this.opts.heartbeatMs) return
    this.lastPing = now
    this.pingSeq = (this.pingSeq + 1) >>> 0
    const seq = this.pingSeq
    this.pingsSent.set(seq, performance.now())
    if (this.pingsSent.size > 16) this.pingsSent.delete(this.pingsSent.keys().next().value!)
    this.sendHeartbeat(HB_PING, seq)
  }

  private onHeartbeat(data: Buffer): void {
    if (this.state !== 'open') return
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
    const b = Buffer.allocUnsafe(5)
    b[0] = kind
    b.writeUInt32BE(seq, 1)
    try {
      if (this.heartbeat.isOpen()) this.heartbeat.sendMessageBinary(b)
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

const PATH_RANK: Record<PathType, number> = { memory: -1, host: 0, prflx: 1, srflx: 2, relay: 3 }

function asPathType(t: string | undefined): PathType {
  return t === 'srflx' || t === 'prflx' || t === 'relay' ? t : 'host'
}

/** The selected pair's most indirect candidate type: relay if either end relays, and so on. */
export function selectedPath(pc: PeerConnection): PathInfo {
  let pair: ReturnType<PeerConnection['getSelectedCandidatePair']> = null
  try {
    pair = pc.getSelectedCandidatePair()
  } catch {
    pair = null
  }
  if (pair == null) return { type: 'host' }
  const lt = asPathType(pair.local.type)
  const rt = asPathType(pair.remote.type)
  return {
    type: PATH_RANK[lt] >= PATH_RANK[rt] ? lt : rt,
    local: `${lt} ${pair.local.address}:${pair.local.port}`,
    remote: `${rt} ${pair.remote.address}:${pair.remote.port}`,
  }
}

/** W3C-style ICE servers (`stun:h:p`, `turn:h:p?transport=tcp` + username/credential) in the form
 *  node-datachannel takes: STUN as a string, TURN as an object (credentials never in a URL). */
export function toNdcIceServers(servers: IceServer[]): (string | nodeDataChannel.IceServer)[] {
  const out: (string | nodeDataChannel.IceServer)[] = []
  for (const s of servers) {
    for (const url of Array.isArray(s.urls) ? s.urls : [s.urls]) {
      const m = /^(stuns?|turns?):(\[[^\]]+\]|[^:?]+)(?::(\d+))?(?:\?transport=(udp|tcp))?$/i.exec(url.trim())
      if (m === null) continue
      const scheme = m[1]!.toLowerCase()
      const host = m[2]!.replace(/^\[|\]$/g, '')
      const port = m[3] === undefined ? (scheme.endsWith('s') ? 5349 : 3478) : Number(m[3])
      if (scheme.startsWith('stun')) out.push(`stun:${host}:${port}`)
      else
        out.push({
          hostname: host,
          port,
          username: s.username ?? '',
          password: s.credential ?? '',
          relayType: scheme === 'turns' ? 'TurnTls' : m[4]?.toLowerCase() === 'tcp' ? 'TurnTcp' : 'TurnUdp',
        })
    }
  }
  return out
}

function waitGatheringComplete(pc: PeerConnection, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    let finished = false
    const done = () => {
      finished = true
      clearInterval(poll)
      signal.removeEventListener('abort', onAbort)
    }
    const check = () => {
      if (finished) return
      if (pc.gatheringState() === 'complete') {
        done()
        resolve()
      }
    }
    const onAbort = () => {
      if (finished) return
      done()
      reject(signal.reason)
    }
    // The native callback is a single slot (the link does not use it otherwise); a short poll
    // covers the window between setLocalDescription and registering it.
    pc.onGatheringStateChange(() => check())
    const poll = setInterval(check, 20)
    signal.addEventListener('abort', onAbort, { once: true })
    check()
  })
}

function waitOpen(dc: DataChannel, signal: AbortSignal): Promise<void> {
  if (dc.isOpen()) return Promise.resolve()
  return new Promise((resolve, reject) => {
    let finished = false
    const done = () => {
      finished = true
      signal.removeEventListener('abort', onAbort)
    }
    dc.onOpen(() => {
      if (finished) return
      done()
      resolve()
    })
    dc.onClosed(() => {
      if (finished) return
      done()
      reject(new LinkConnectError(`data channel ${dc.getLabel()} closed while connecting`))
    })
    const onAbort = () => {
      if (finished) return
      done()
      reject(signal.reason)
    }
    signal.addEventListener('abort', onAbort, { once: true })
    // Open may have happened between the check above and registering the callback.
    if (dc.isOpen() && !finished) {
      done()
      resolve()
    }
  })
}

function createChannels(pc: PeerConnection): { dcs: Map<ChannelName, DataChannel>; heartbeat: DataChannel } {
  const dcs = new Map<ChannelName, DataChannel>()
  for (const name of CHANNEL_NAMES) {
    const spec = CHANNELS[name]
    dcs.set(
      name,
      pc.createDataChannel(name, {
        negotiated: true,
        id: spec.id,
        unordered: !spec.ordered,
        ...(spec.reliable ? {} : { maxRetransmits: 0 }),
      }),
    )
  }
  const heartbeat = pc.createDataChannel('heartbeat', { negotiated: true, id: HEARTBEAT_ID })
  return { dcs, heartbeat }
}

let sequence = 0

/**
 * Builds a link to `peer` with libdatachannel: same protocol as createWebRtcLink (either end may be
 * werift). Resolves once every channel is open; rejects with LinkConnectError or AbortError, leaving
 * nothing open.
 */
export async function createNdcLink(options: NdcLinkOptions): Promise<NdcLink> {
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

  const pc = new NativePeerConnection(`mesh-${process.pid}-${++sequence}`, {
    iceServers: toNdcIceServers(options.iceServers ?? []),
    iceTransportPolicy: options.iceTransportPolicy ?? 'all',
    // Offer/answer is driven below: the answerer's channels must not trigger an offer of its own.
    disableAutoNegotiation: true,
    maxMessageSize: MAX_MESSAGE_SIZE + 1024,
    ...(options.iceInterfaceAddress ? { bindAddress: options.iceInterfaceAddress } : {}),
    ...(options.portRange
      ? { portRangeBegin: options.portRange[0], portRangeEnd: options.portRange[1] }
      : {}),
  })
  let channels: ReturnType<typeof createChannels> | undefined

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
  const applyCandidates = () => {
    for (const m of queued.splice(0)) {
      if (m.type !== 'candidate') continue
      try {
        pc.addRemoteCandidate(m.candidate, m.sdpMid ?? '0')
      } catch {
        // A candidate we cannot use (other address family, malformed) is not fatal.
      }
    }
  }
  const localSdp = (): string => {
    const d = pc.localDescription()
    if (d === null) throw new LinkConnectError(`link to ${options.peer}: no local description`)
    return d.sdp
  }

  try {
    if (options.initiator) {
      channels = createChannels(pc)
      pc.setLocalDescription('offer')
      await waitGatheringComplete(pc, ctl.signal)
      options.signaling.send({ v: 1, session, type: 'offer', sdp: localSdp() })
      const answer = await next('answer')
      pc.setRemoteDescription(answer.sdp, 'answer')
    } else {
      const offer = await next('offer')
      session = offer.session
      for (let i = queued.length - 1; i >= 0; i--) if (queued[i]!.session !== session) queued.splice(i, 1)
      pc.setRemoteDescription(offer.sdp, 'offer')
      channels = createChannels(pc)
      pc.setLocalDescription('answer')
      await waitGatheringComplete(pc, ctl.signal)
      options.signaling.send({ v: 1, session, type: 'answer', sdp: localSdp() })
    }
    applyCandidates()
    const { dcs, heartbeat } = channels
    const failed = new Promise<never>((_, reject) => {
      pc.onStateChange((s) => {
        if (s === 'failed' || s === 'closed')
          reject(new LinkConnectError(`link to ${options.peer}: connection ${s}`))
      })
    })
    failed.catch(() => {})
    await Promise.race([
      Promise.all([...dcs.values(), heartbeat].map((dc) => waitOpen(dc, ctl.signal))),
      failed,
    ])
    const link = new NdcLink(options.peer, session, pc, dcs, heartbeat, {
      heartbeatMs: options.heartbeatMs ?? 1000,
      deadAfterMs: options.deadAfterMs ?? 4500,
      highWaterMark,
      lowWaterMark,
    })
    link.path = selectedPath(pc)
    link.setupMs = performance.now() - started
    const outer = options.signal
    if (outer !== undefined) {
      const onAbort = () => link.close(new AbortError('link aborted', { cause: outer.reason }))
      outer.addEventListener('abort', onAbort, { once: true })
      link.onClose(() => outer.removeEventListener('abort', onAbort))
    }
    return link
  } catch (err) {
    if (session !== '') options.signaling.send({ v: 1, session, type: 'bye', reason: 'connect failed' })
    try {
      pc.close()
    } catch {
      // already closed
    }
    if (err instanceof AbortError || err instanceof LinkConnectError) throw err
    throw new LinkConnectError(
      `link to ${options.peer}: ${err instanceof Error ? err.message : String(err)}`,
      { cause: err },
    )
  } finally {
    ctl.abort()
    clearTimeout(timeout)
    options.signal?.removeEventListener('abort', onOuterAbort)
    offSignal()
  }
}
