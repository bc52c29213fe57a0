/**
 * An in-memory WebRTC engine (net/webrtc/engine.ts) for unit tests of the one link (net/webrtc/link.ts):
 * two connected EngineConnections whose channels hand messages to each other on the next turn. It
 * records what each end sent and who listens, so tests can see the link's heartbeat and its cleanup.
 */
import { Listeners } from '../../net/link/channel-base.ts'
import type { PathInfo } from '../../net/link/interfaces.ts'
import type {
  EngineChannel,
  EngineChannelSpec,
  EngineConnection,
  EngineConnectionState,
} from '../../net/webrtc/engine.ts'

export class FakeChannel implements EngineChannel {
  peer: FakeChannel | undefined
  isOpen = true
  bufferedAmount = 0
  /** Every message sent, in order (copies). */
  readonly sent: (Uint8Array | string)[] = []
  private messageHandler: ((data: Uint8Array | string) => void) | undefined
  readonly closeListeners = new Listeners<[Error | undefined]>()
  released = false

  constructor(readonly label: string) {}

  send(data: Uint8Array | string): void {
    if (!this.isOpen) throw new Error('fake channel closed')
    const copy = typeof data === 'string' ? data : data.slice()
    this.sent.push(copy)
    const to = this.peer
    setImmediate(() => to?.deliver(copy))
  }

  /** Hands a message to whoever listens on this end, as the engine would. */
  deliver(data: Uint8Array | string): void {
    if (this.isOpen) this.messageHandler?.(data)
  }

  onLow(_threshold: number, _handler: () => void): void {}

  onMessage(handler: (data: Uint8Array | string) => void): void {
    this.messageHandler = handler
  }

  onOpen(handler: () => void): () => void {
    queueMicrotask(handler)
    return () => {}
  }

  onClose(handler: (sendFailure?: Error) => void): () => void {
    return this.closeListeners.add(handler)
  }

  release(): void {
    this.released = true
    this.messageHandler = undefined
    this.closeListeners.clear()
  }
}

export class FakeConnection implements EngineConnection {
  readonly engine = 'werift' as const
  readonly channels: FakeChannel[]
  readonly stateListeners = new Listeners<[EngineConnectionState]>()
  /** How many onStateChange handlers are subscribed right now. */
  stateSubscribers = 0
  closedCalls = 0

  constructor(specs: readonly EngineChannelSpec[]) {
    this.channels = specs.map((s) => new FakeChannel(s.label))
  }

  async createOffer(): Promise<string> {
    return 'v=0'
  }
  async acceptAnswer(): Promise<void> {}
  async createAnswer(): Promise<string> {
    return 'v=0'
  }
  async addRemoteCandidate(): Promise<void> {}

  onStateChange(handler: (state: EngineConnectionState) => void): () => void {
    this.stateSubscribers++
    const off = this.stateListeners.add(handler)
    let on = true
    return () => {
      if (on) this.stateSubscribers--
      on = false
      off()
    }
  }

  established(): void {}

  path(): PathInfo {
    return { type: 'host', local: 'host fake:1', remote: 'host fake:2' }
  }

  async close(): Promise<void> {
    this.closedCalls++
    for (const c of this.channels) c.isOpen = false
  }
}

/** Two connected fake connections with the given channel specs. */
export function fakeConnectionPair(specs: readonly EngineChannelSpec[]): [FakeConnection, FakeConnection] {
  const a = new FakeConnection(specs)
  const b = new FakeConnection(specs)
  a.channels.forEach((c, i) => {
    c.peer = b.channels[i]
    b.channels[i]!.peer = c
  })
  return [a, b]
}
