/**
 * What the one WebRTC link (./link.ts) needs from a WebRTC engine: a peer connection that can make or
 * answer an offer with every candidate gathered, a fixed set of pre-negotiated data channels, and the
 * selected path. Everything the two ends agree on — signaling, sessions, channel ids, heartbeat,
 * backpressure, close — lives in the link, once; an engine adapter only translates its library's API.
 *
 * Engines: 'werift' (./werift/engine.ts, pure TypeScript) and 'libdatachannel' (./ndc/engine.ts,
 * npm `node-datachannel`, native). Both speak the same wire protocol: a werift end and a libdatachannel
 * end form one link.
 */
import type { PathInfo } from '../link/interfaces.ts'
import type { IceServer } from './interfaces.ts'
import type { CandidateMessage } from './v1/messages.ts'

export type LinkEngine = 'werift' | 'libdatachannel'

/** One pre-negotiated data channel (`negotiated: true`, fixed SCTP stream id, no DCEP). */
export interface EngineChannelSpec {
  readonly label: string
  readonly id: number
  readonly ordered: boolean
  /** 0: never retransmitted (PR-SCTP). Absent: fully reliable. */
  readonly maxRetransmits?: number
}

/** A data channel as an engine provides it; the link turns it into a MessageChannel. */
export interface EngineChannel {
  readonly label: string
  readonly isOpen: boolean
  /** Bytes accepted by send() and not yet handed to the network (engine queues included). */
  readonly bufferedAmount: number
  /** Takes a copy of `data` (the caller may reuse its buffer at once); a string goes as a text message.
   *  Throws when the engine refuses it synchronously. */
  send(data: Uint8Array | string): void
  /** `handler` runs after bufferedAmount fell to `threshold` or below; it may run late or more than once
   *  (the caller re-checks). One handler per channel. */
  onLow(threshold: number, handler: () => void): void
  /** One handler per channel; binary messages as Uint8Array, text messages as string. */
  onMessage(handler: (data: Uint8Array | string) => void): void
  /** Runs once when the channel opens. */
  onOpen(handler: () => void): () => void
  /** Runs once when the channel closes: without an error when the transport closed it, with one when
   *  the engine failed to send queued data (the channel is unusable then). */
  onClose(handler: (sendFailure?: Error) => void): () => void
  /** Drops every callback and queued message: the link is done with this channel. */
  release(): void
}

export type EngineConnectionState = 'failed' | 'closed'

/** One peer connection of an engine, with its channels created from the specs it was made with. */
export interface EngineConnection {
  readonly engine: LinkEngine
  /** The channels, in the order of the specs; available once createOffer() or createAnswer() returned. */
  readonly channels: readonly EngineChannel[]
  /** Initiator: makes the offer, waits until every local candidate is gathered, returns the SDP. */
  createOffer(signal: AbortSignal): Promise<string>
  /** Initiator: applies the peer's answer. */
  acceptAnswer(sdp: string): Promise<void>
  /** Answerer: applies the offer, makes the answer, waits for gathering, returns the SDP. */
  createAnswer(offerSdp: string, signal: AbortSignal): Promise<string>
  /** A candidate trickled separately (after the remote SDP). Rejects if the engine cannot use it. */
  addRemoteCandidate(candidate: CandidateMessage): Promise<void>
  /** Runs on every transition to failed or closed; returns a function that removes the handler. */
  onStateChange(handler: (state: EngineConnectionState) => void): () => void
  /** Called once every channel is open (engine-specific tuning of an established connection). */
  established(): void
  /** The selected candidate pair. */
  path(): PathInfo
  /** Closes the connection and its sockets; never rejects. */
  close(): Promise<void>
}

/** Connection options the link passes to every engine (each ignores what it cannot apply). */
export interface EngineOptions {
  readonly iceServers: readonly IceServer[]
  readonly iceTransportPolicy: 'all' | 'relay'
  /** Extra local addresses to offer as host candidates (werift skips 127.0.0.1 otherwise). */
  readonly iceAdditionalHostAddresses?: readonly string[]
  /** Bind ICE sockets to this IPv4 address only. */
  readonly iceInterfaceAddress?: string
  readonly portRange?: readonly [number, number]
  /** UDP socket send/receive buffer size (werift; libjuice sizes its own sockets). */
  readonly udpBufferBytes: number
  /** Largest message advertised in the SDP (a=max-message-size). */
  readonly maxMessageSize: number
  /** SCTP congestion control (werift; libdatachannel's is usrsctp's, see ndc/engine.ts). */
  readonly congestionControl: CongestionControl
}

/**
 * 'tolerant' (patches/werift+0.24.4.patch): RFC 9260's window, but only a loss that looks like
 * congestion shrinks it — a round trip whose fastest chunk shows a queue (over 1.5 × min RTT + 10 ms), or
 * over 2% of a round trip lost — and then to the measured bandwidth × min RTT (Westwood+), not blindly by
 * half; random loss on a long path is repaired without shrinking it. 'reno': every loss halves (RFC
 * 9260), kept for comparison.
 */
export type CongestionControl = 'tolerant' | 'reno'

export type EngineFactory = (options: EngineOptions, specs: readonly EngineChannelSpec[]) => EngineConnection

export const LINK_ENGINES: readonly LinkEngine[] = ['werift', 'libdatachannel']
export const DEFAULT_LINK_ENGINE: LinkEngine = 'werift'
