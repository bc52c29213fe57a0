/**
 * The werift engine (pure TypeScript WebRTC) behind the EngineConnection contract (../engine.ts).
 *
 * - UDP socket buffers are raised (DESIGN.md: the 208 KiB default drops thousands of packets per run).
 * - Once established, werift's ICE consent expiry is switched off (see relaxConsent); the link's own
 *   heartbeat replaces it.
 * - Each channel keeps its own send queue and hands werift only a small window (see WeriftChannel).
 * - werift's partial reliability (the tunnel channel's maxRetransmits 0) and SACK timing are fixed by
 *   patches/werift+0.24.4.patch (applied by patch-package at npm install); proven by
 *   test/system/webrtc-unreliable.test.ts.
 */

import type { Socket } from 'node:dgram'
import { type RTCDataChannel, RTCPeerConnection } from 'werift'
import { onAbort } from '../../../src/base/abort.ts'
import { Listeners } from '../../link/channel-base.ts'
import type { PathInfo } from '../../link/interfaces.ts'
import type {
  CongestionControl,
  EngineChannel,
  EngineChannelSpec,
  EngineConnection,
  EngineConnectionState,
  EngineFactory,
  EngineOptions,
} from '../engine.ts'
import { pairPath } from '../path.ts'
import type { CandidateMessage } from '../v1/messages.ts'

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

class WeriftChannel implements EngineChannel {
  private readonly queue: (Buffer | string)[] = []
  private queuedBytes = 0
  /** Sizes of the messages handed to werift and not yet sent, oldest first. */
  private readonly handed: number[] = []
  private handedBytes = 0
  private lowThreshold = 0
  private lowHandler: (() => void) | undefined
  private readonly openListeners = new Listeners<[]>()
  private readonly closeListeners = new Listeners<[Error | undefined]>()
  private released = false

  constructor(readonly dc: RTCDataChannel) {
    dc.bufferedAmountLowThreshold = 0
    dc.bufferedAmountLow.subscribe(() => this.pump())
    dc.stateChanged.subscribe((s) => {
      if (s === 'open') this.openListeners.emit()
      else if (s === 'closed') this.closeListeners.emit(undefined)
    })
  }

  get label(): string {
    return this.dc.label
  }

  get isOpen(): boolean {
    return this.dc.readyState === 'open'
  }

  get bufferedAmount(): number {
    return this.queuedBytes + this.dc.bufferedAmount
  }

  send(data: Uint8Array | string): void {
    // Copy: the caller may reuse its buffer once send() returns.
    this.queue.push(typeof data === 'string' ? data : Buffer.from(data))
    this.queuedBytes += typeof data === 'string' ? 0 : data.byteLength
    this.pump()
  }

  onLow(threshold: number, handler: () => void): void {
    this.lowThreshold = threshold
    this.lowHandler = handler
  }

  onMessage(handler: (data: Uint8Array | string) => void): void {
    this.dc.onMessage.allUnsubscribe()
    this.dc.onMessage.subscribe((data) =>
      handler(
        typeof data === 'string' ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
      ),
    )
  }

  onOpen(handler: () => void): () => void {
    return this.openListeners.add(handler)
  }

  onClose(handler: (sendFailure?: Error) => void): () => void {
    return this.closeListeners.add(handler)
  }

  /** Moves queued messages into werift while its window has room; tells the low handler. */
  private pump(): void {
    if (this.released || this.dc.readyState !== 'open') return
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
        this.dropQueue()
        this.closeListeners.emit(err instanceof Error ? err : new Error(String(err)))
        return
      }
      const accounted = typeof m === 'string' ? 1 : size
      this.handed.push(accounted)
      this.handedBytes += accounted
    }
    if (this.bufferedAmount <= this.lowThreshold) this.lowHandler?.()
  }

  private dropQueue(): void {
    this.queue.length = 0
    this.queuedBytes = 0
  }

  release(): void {
    this.released = true
    this.dropQueue()
    this.lowHandler = undefined
    this.openListeners.clear()
    this.closeListeners.clear()
    this.dc.bufferedAmountLow.allUnsubscribe()
    this.dc.onMessage.allUnsubscribe()
    this.dc.stateChanged.allUnsubscribe()
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

/** The selected pair's most indirect candidate type: relay if either end relays, and so on. */
export function selectedPath(pc: RTCPeerConnection): PathInfo {
  const pair = pc.iceTransports[0]?.getSelectedCandidatePair() as
    | { local: CandidateLike; remote: CandidateLike }
    | null
    | undefined
  if (pair == null) return { type: 'host' }
  return pairPath(parseCandidate(pair.local), parseCandidate(pair.remote))
}

interface SocketOwner {
  transport?: { socket?: Socket }
  turn?: { transport?: { socket?: Socket } }
}

/** Every UDP socket the peer connection's ICE agent opened: werift keeps them in its ICE connection's
 *  `protocols` (one per host address, plus the TURN client's). Internals: an empty list if they moved. */
export function udpSockets(pc: RTCPeerConnection): Socket[] {
  const out: Socket[] = []
  for (const t of pc.iceTransports) {
    const protocols = (t.connection as unknown as { protocols?: SocketOwner[] }).protocols ?? []
    for (const p of protocols) {
      for (const s of [p.transport?.socket, p.turn?.transport?.socket]) if (s !== undefined) out.push(s)
    }
  }
  return out
}

/** Raises the buffers of every UDP socket of the peer connection (werift has no option for it).
 *  An optimisation: any failure here is ignored. */
export function enlargeUdpBuffers(pc: RTCPeerConnection, bytes: number): number {
  let n = 0
  for (const s of udpSockets(pc)) {
    if (typeof s.setRecvBufferSize !== 'function') continue
    try {
      s.setRecvBufferSize(bytes)
      s.setSendBufferSize(bytes)
      n++
    } catch {
      // Not bound yet, or closed: keep the default.
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

/** Chooses the SCTP association's congestion control (a field patches/werift+0.24.4.patch adds; does
 *  nothing on a werift without it). */
export function setCongestionControl(pc: RTCPeerConnection, cc: CongestionControl): boolean {
  const sctp = (pc.sctpTransport as unknown as { sctp?: { congestionControl?: string } } | undefined)?.sctp
  if (sctp === undefined || !('congestionControl' in sctp)) return false
  sctp.congestionControl = cc
  return true
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
    const done = () => {
      sub.unSubscribe()
      offAbort()
    }
    const offAbort = onAbort(signal, (reason) => {
      done()
      reject(reason)
    })
  })
}

export class WeriftConnection implements EngineConnection {
  readonly engine = 'werift'
  readonly pc: RTCPeerConnection
  readonly channels: readonly WeriftChannel[]

  constructor(
    private readonly options: EngineOptions,
    specs: readonly EngineChannelSpec[],
  ) {
    this.pc = new RTCPeerConnection({
      iceServers: options.iceServers.map((s) => ({ ...s })),
      iceTransportPolicy: options.iceTransportPolicy,
      iceUseIpv6: false,
      ...(options.iceAdditionalHostAddresses
        ? { iceAdditionalHostAddresses: [...options.iceAdditionalHostAddresses] }
        : {}),
      ...(options.iceInterfaceAddress
        ? { iceInterfaceAddresses: { udp4: options.iceInterfaceAddress } }
        : {}),
      ...(options.portRange ? { icePortRange: [options.portRange[0], options.portRange[1]] } : {}),
      maxMessageSize: options.maxMessageSize,
    })
    // werift creates pre-negotiated channels before the offer/answer, on both ends.
    this.channels = specs.map(
      (s) =>
        new WeriftChannel(
          this.pc.createDataChannel(s.label, {
            negotiated: true,
            id: s.id,
            ordered: s.ordered,
            ...(s.maxRetransmits === undefined ? {} : { maxRetransmits: s.maxRetransmits }),
          }),
        ),
    )
  }

  private async gathered(signal: AbortSignal): Promise<string> {
    await waitGatheringComplete(this.pc, signal)
    enlargeUdpBuffers(this.pc, this.options.udpBufferBytes)
    return this.pc.localDescription!.sdp
  }

  async createOffer(signal: AbortSignal): Promise<string> {
    await this.pc.setLocalDescription(await this.pc.createOffer())
    return this.gathered(signal)
  }

  async acceptAnswer(sdp: string): Promise<void> {
    await this.pc.setRemoteDescription({ type: 'answer', sdp })
  }

  async createAnswer(offerSdp: string, signal: AbortSignal): Promise<string> {
    await this.pc.setRemoteDescription({ type: 'offer', sdp: offerSdp })
    await this.pc.setLocalDescription(await this.pc.createAnswer())
    return this.gathered(signal)
  }

  async addRemoteCandidate(c: CandidateMessage): Promise<void> {
    await this.pc.addIceCandidate({
      candidate: c.candidate,
      ...(c.sdpMid === undefined ? {} : { sdpMid: c.sdpMid }),
      ...(c.sdpMLineIndex === undefined ? {} : { sdpMLineIndex: c.sdpMLineIndex }),
    })
  }

  onStateChange(handler: (state: EngineConnectionState) => void): () => void {
    const sub = this.pc.connectionStateChange.subscribe((s) => {
      if (s === 'failed' || s === 'closed') handler(s)
    })
    return () => sub.unSubscribe()
  }

  established(): void {
    relaxConsent(this.pc)
    setCongestionControl(this.pc, this.options.congestionControl)
  }

  path(): PathInfo {
    return selectedPath(this.pc)
  }

  /** The ICE agent's UDP sockets (tests inject loss on them). */
  udpSockets(): Socket[] {
    return udpSockets(this.pc)
  }

  async close(): Promise<void> {
    await this.pc.close().catch(() => {})
  }
}

export const createWeriftConnection: EngineFactory = (options, specs) => new WeriftConnection(options, specs)
