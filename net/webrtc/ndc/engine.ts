/**
 * The libdatachannel engine (npm `node-datachannel`, native API, not its W3C polyfill) behind the
 * EngineConnection contract (../engine.ts). Its binary comes from the platform package
 * `@node-datachannel/linux-x64-gnu` (no install script); this module is loaded only when the engine is
 * chosen. Several times faster than werift here (README, `npm run bench -- link --engine
 * libdatachannel`), with real PR-SCTP (usrsctp) on the tunnel channel.
 *
 * - max message size: the SDP advertises the link's (libdatachannel's own default is exactly 256 KiB
 *   and it refuses larger sends using the peer's advertised value).
 * - libdatachannel copies each message into its own queue at send time, so no JS-side queue is needed.
 * - Its callbacks are single slots; the adapter fans them out so every subscriber can also leave.
 */

import nodeDataChannel from 'node-datachannel'
import { onAbort } from '../../../src/base/abort.ts'
import { Listeners } from '../../link/channel-base.ts'
import type { PathInfo } from '../../link/interfaces.ts'
import type {
  EngineChannel,
  EngineChannelSpec,
  EngineConnection,
  EngineConnectionState,
  EngineFactory,
  EngineOptions,
} from '../engine.ts'
import type { IceServer } from '../interfaces.ts'
import { pairPath } from '../path.ts'
import type { CandidateMessage } from '../v1/messages.ts'

type PeerConnection = nodeDataChannel.PeerConnection
type DataChannel = nodeDataChannel.DataChannel
const { PeerConnection: NativePeerConnection } = nodeDataChannel

/**
 * usrsctp's settings for every association this process creates (they are process-wide in
 * libdatachannel, read when an association is made). libdatachannel's 1 MiB send/receive buffers cap a
 * flight at 1 MiB: 8.7 MB/s at 120 ms whatever the path (issue 13 measured ~17 → ~35 MB/s at 30 ms with
 * 8–16 MiB). Its congestion control stays RFC 4960's (module 0): the H-TCP module stalled in 2 of 10
 * runs (issue 13).
 */
export const NDC_SCTP_SETTINGS: Readonly<nodeDataChannel.SctpSettings> = {
  recvBufferSize: 8 * 1024 * 1024,
  sendBufferSize: 8 * 1024 * 1024,
  // 8 MiB of 1,200-byte chunks is ~7,000; libdatachannel's default cap is 10,240.
  maxChunksOnQueue: 16 * 1024,
  initialCongestionWindow: 10,
  congestionControlModule: 0,
}

let sctpSettings: nodeDataChannel.SctpSettings | undefined

/** Sets usrsctp's settings for the associations created from now on (default NDC_SCTP_SETTINGS; what
 *  is given overrides it); returns what applies. Called once before the first connection. */
export function configureNdcSctp(
  overrides: Partial<nodeDataChannel.SctpSettings> = {},
): nodeDataChannel.SctpSettings {
  sctpSettings = { ...NDC_SCTP_SETTINGS, ...overrides }
  nodeDataChannel.setSctpSettings(sctpSettings)
  return sctpSettings
}

class NdcChannel implements EngineChannel {
  private readonly openListeners = new Listeners<[]>()
  private readonly closeListeners = new Listeners<[Error | undefined]>()
  private messageHandler: ((data: Uint8Array | string) => void) | undefined
  private lowHandler: (() => void) | undefined

  constructor(readonly dc: DataChannel) {
    dc.onOpen(() => this.openListeners.emit())
    dc.onClosed(() => this.closeListeners.emit(undefined))
    dc.onBufferedAmountLow(() => this.lowHandler?.())
    dc.onMessage((data) => {
      const h = this.messageHandler
      if (h === undefined) return
      if (typeof data === 'string') h(data)
      else if (data instanceof ArrayBuffer) h(new Uint8Array(data))
      else h(new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
    })
  }

  get label(): string {
    return this.dc.getLabel()
  }

  get isOpen(): boolean {
    try {
      return this.dc.isOpen()
    } catch {
      return false
    }
  }

  get bufferedAmount(): number {
    try {
      return this.dc.bufferedAmount()
    } catch {
      return 0
    }
  }

  send(data: Uint8Array | string): void {
    // Both calls copy the bytes into libdatachannel.
    if (typeof data === 'string') this.dc.sendMessage(data)
    else this.dc.sendMessageBinary(data)
  }

  onLow(threshold: number, handler: () => void): void {
    this.dc.setBufferedAmountLowThreshold(threshold)
    this.lowHandler = handler
  }

  onMessage(handler: (data: Uint8Array | string) => void): void {
    this.messageHandler = handler
  }

  onOpen(handler: () => void): () => void {
    return this.openListeners.add(handler)
  }

  onClose(handler: (sendFailure?: Error) => void): () => void {
    return this.closeListeners.add(handler)
  }

  release(): void {
    this.messageHandler = undefined
    this.lowHandler = undefined
    this.openListeners.clear()
    this.closeListeners.clear()
  }
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
  return pairPath(
    { type: pair.local.type, addr: `${pair.local.address}:${pair.local.port}` },
    { type: pair.remote.type, addr: `${pair.remote.address}:${pair.remote.port}` },
  )
}

/** W3C-style ICE servers (`stun:h:p`, `turn:h:p?transport=tcp` + username/credential) in the form
 *  node-datachannel takes: STUN as a string, TURN as an object (credentials never in a URL). */
export function toNdcIceServers(servers: readonly IceServer[]): (string | nodeDataChannel.IceServer)[] {
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

let sequence = 0

export class NdcConnection implements EngineConnection {
  readonly engine = 'libdatachannel'
  readonly pc: PeerConnection
  private created: NdcChannel[] = []
  private readonly stateListeners = new Listeners<[EngineConnectionState]>()
  private readonly gatheringListeners = new Listeners<[]>()

  constructor(
    options: EngineOptions,
    private readonly specs: readonly EngineChannelSpec[],
  ) {
    if (sctpSettings === undefined) configureNdcSctp()
    this.pc = new NativePeerConnection(`mesh-${process.pid}-${++sequence}`, {
      iceServers: toNdcIceServers(options.iceServers),
      iceTransportPolicy: options.iceTransportPolicy,
      // Offer/answer is driven by the link: the answerer's channels must not trigger an offer of its own.
      disableAutoNegotiation: true,
      maxMessageSize: options.maxMessageSize,
      ...(options.iceInterfaceAddress ? { bindAddress: options.iceInterfaceAddress } : {}),
      ...(options.portRange
        ? { portRangeBegin: options.portRange[0], portRangeEnd: options.portRange[1] }
        : {}),
    })
    this.pc.onStateChange((s) => {
      if (s === 'failed' || s === 'closed') this.stateListeners.emit(s)
    })
    this.pc.onGatheringStateChange(() => this.gatheringListeners.emit())
  }

  get channels(): readonly EngineChannel[] {
    return this.created
  }

  /** libdatachannel wants pre-negotiated channels before the offer, and on the answering side after
   *  the remote offer. */
  private createChannels(): void {
    this.created = this.specs.map(
      (s) =>
        new NdcChannel(
          this.pc.createDataChannel(s.label, {
            negotiated: true,
            id: s.id,
            unordered: !s.ordered,
            ...(s.maxRetransmits === undefined ? {} : { maxRetransmits: s.maxRetransmits }),
          }),
        ),
    )
  }

  private localSdp(): string {
    const d = this.pc.localDescription()
    if (d === null) throw new Error('no local description')
    return d.sdp
  }

  private gathered(signal: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      let finished = false
      const done = () => {
        finished = true
        clearInterval(poll)
        offGathering()
        offAbort()
      }
      const check = () => {
        if (finished) return
        if (this.pc.gatheringState() === 'complete') {
          done()
          resolve()
        }
      }
      const offGathering = this.gatheringListeners.add(check)
      // A short poll covers a state change that the callback reported before this wait began.
      const poll = setInterval(check, 20)
      const offAbort = onAbort(signal, (reason) => {
        if (finished) return
        done()
        reject(reason)
      })
      check()
    })
  }

  async createOffer(signal: AbortSignal): Promise<string> {
    this.createChannels()
    this.pc.setLocalDescription('offer')
    await this.gathered(signal)
    return this.localSdp()
  }

  async acceptAnswer(sdp: string): Promise<void> {
    this.pc.setRemoteDescription(sdp, 'answer')
  }

  async createAnswer(offerSdp: string, signal: AbortSignal): Promise<string> {
    this.pc.setRemoteDescription(offerSdp, 'offer')
    this.createChannels()
    this.pc.setLocalDescription('answer')
    await this.gathered(signal)
    return this.localSdp()
  }

  async addRemoteCandidate(c: CandidateMessage): Promise<void> {
    this.pc.addRemoteCandidate(c.candidate, c.sdpMid ?? '0')
  }

  onStateChange(handler: (state: EngineConnectionState) => void): () => void {
    return this.stateListeners.add(handler)
  }

  established(): void {}

  path(): PathInfo {
    return selectedPath(this.pc)
  }

  async close(): Promise<void> {
    try {
      this.pc.close()
    } catch {
      // already closed
    }
  }
}

export const createNdcConnection: EngineFactory = (options, specs) => new NdcConnection(options, specs)
