import { ChannelBase, Listeners } from './channel-base.ts'
import { ChannelClosedError, MessageTooLargeError } from './errors.ts'
import {
  CHANNEL_NAMES,
  CHANNELS,
  type ChannelName,
  type Link,
  type LinkState,
  MAX_MESSAGE_SIZE,
  type MessageChannel,
  type Overlay,
  type PathInfo,
} from './interfaces.ts'

/**
 * In-memory links for fast unit tests. Same contract as the WebRTC links (the compliance suite runs on
 * both): asynchronous delivery, a send buffer with high/low water marks, drops (never retransmits) on
 * the unreliable channel, and close propagation.
 */
export interface MemoryLinkOptions {
  /** send() returns false above this many buffered bytes (default 1 MiB). */
  highWaterMark?: number
  /** onDrain() resolves at or below this (default highWaterMark / 4). */
  lowWaterMark?: number
  /** Bytes moved per event-loop turn, i.e. the simulated bandwidth (default 4 MiB). */
  bytesPerTick?: number
  /** Probability that a message on an unreliable channel is lost (default 0). */
  lossRate?: number
  /** Random source for loss decisions (default Math.random), injectable for deterministic tests. */
  random?: () => number
}

class MemoryChannel extends ChannelBase {
  readonly reliable: boolean
  bufferedAmount = 0
  remote: MemoryChannel | undefined
  private readonly queue: Uint8Array[] = []
  private scheduled = false

  constructor(
    readonly name: ChannelName,
    private readonly opts: Required<MemoryLinkOptions>,
  ) {
    super()
    this.reliable = CHANNELS[name].reliable
  }

  protected get lowWaterMark(): number {
    return this.opts.lowWaterMark
  }

  send(message: Uint8Array): boolean {
    if (this.state === 'closed') throw new ChannelClosedError(`channel '${this.name}' is closed`)
    if (message.byteLength > MAX_MESSAGE_SIZE)
      throw new MessageTooLargeError(message.byteLength, MAX_MESSAGE_SIZE)
    if (!this.reliable) {
      if (this.bufferedAmount + message.byteLength > this.opts.highWaterMark) return false
      if (this.opts.lossRate > 0 && this.opts.random() < this.opts.lossRate) return true
    }
    // Copy: the caller may reuse its buffer as soon as send() returns, as with a real socket.
    this.queue.push(message.slice())
    this.bufferedAmount += message.byteLength
    this.schedule()
    return this.bufferedAmount < this.opts.highWaterMark
  }

  deliver(message: Uint8Array): void {
    if (this.state === 'open') this.messageListeners.emit(message)
  }

  close(reason?: Error): void {
    if (this.state === 'closed') return
    this.state = 'closed'
    this.queue.length = 0
    this.bufferedAmount = 0
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    this.messageListeners.clear()
    this.drainListeners.clear()
  }

  private schedule(): void {
    if (this.scheduled) return
    this.scheduled = true
    setImmediate(() => this.flush())
  }

  private flush(): void {
    this.scheduled = false
    let budget = this.opts.bytesPerTick
    while (this.queue.length > 0 && budget > 0 && this.state === 'open') {
      const msg = this.queue.shift()!
      this.bufferedAmount -= msg.byteLength
      budget -= msg.byteLength
      this.remote?.deliver(msg)
    }
    if (this.state !== 'open') return
    if (this.bufferedAmount <= this.opts.lowWaterMark) this.drainListeners.emit()
    if (this.queue.length > 0) this.schedule()
  }
}

class MemoryLink implements Link {
  state: LinkState = 'open'
  readonly path: PathInfo = { type: 'memory' }
  readonly channels = new Map<ChannelName, MemoryChannel>()
  private readonly closeListeners = new Listeners<[Error | undefined]>()
  other: MemoryLink | undefined

  constructor(
    readonly peer: string,
    opts: Required<MemoryLinkOptions>,
  ) {
    for (const name of CHANNEL_NAMES) this.channels.set(name, new MemoryChannel(name, opts))
  }

  channel(name: ChannelName): MessageChannel {
    const ch = this.channels.get(name)
    if (ch === undefined) throw new TypeError(`unknown channel '${name}'`)
    return ch
  }

  close(reason?: Error): void {
    if (this.state === 'closed') return
    this.state = 'closed'
    for (const ch of this.channels.values()) ch.close(reason)
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    // Closing one end closes the other, as a transport failure would be seen by both.
    this.other?.close(reason)
  }

  onClose(handler: (reason?: Error) => void): () => void {
    if (this.state === 'closed') {
      queueMicrotask(() => handler())
      return () => {}
    }
    return this.closeListeners.add(handler)
  }
}

function withDefaults(opts: MemoryLinkOptions): Required<MemoryLinkOptions> {
  const highWaterMark = opts.highWaterMark ?? 1024 * 1024
  return {
    highWaterMark,
    lowWaterMark: opts.lowWaterMark ?? Math.floor(highWaterMark / 4),
    bytesPerTick: opts.bytesPerTick ?? 4 * 1024 * 1024,
    lossRate: opts.lossRate ?? 0,
    random: opts.random ?? Math.random,
  }
}

/** Two connected link ends: `a` is a's link to peer b, `b` is b's link to peer a. */
export function createMemoryLinkPair(
  peerA: string,
  peerB: string,
  options: MemoryLinkOptions = {},
): { a: Link; b: Link } {
  const opts = withDefaults(options)
  const a = new MemoryLink(peerB, opts)
  const b = new MemoryLink(peerA, opts)
  a.other = b
  b.other = a
  for (const name of CHANNEL_NAMES) {
    a.channels.get(name)!.remote = b.channels.get(name)
    b.channels.get(name)!.remote = a.channels.get(name)
  }
  return { a, b }
}

/**
 * An Overlay over links the caller made itself (the in-memory network below, a chunk or tunnel node in
 * its own process, a test rig): `add` a link and services see it appear; it disappears when it closes.
 */
export function createLinkSetOverlay(self: string): { overlay: Overlay; add(link: Link): void } {
  const links = new Map<string, Link>()
  const listeners = new Listeners<[Link]>()
  const overlay: Overlay = {
    self,
    link: (peer) => links.get(peer),
    links: () => [...links.values()],
    onLink: (h) => listeners.add(h),
  }
  return {
    overlay,
    add(link) {
      links.set(link.peer, link)
      link.onClose(() => {
        if (links.get(link.peer) === link) links.delete(link.peer)
      })
      listeners.emit(link)
    },
  }
}

/** A set of in-process overlay nodes; `connect` links two of them, `disconnect` cuts that link. */
export interface MemoryNetwork {
  node(id: string): Overlay
  connect(a: string, b: string, options?: MemoryLinkOptions): void
  disconnect(a: string, b: string): void
}

export function createMemoryNetwork(): MemoryNetwork {
  const nodes = new Map<string, ReturnType<typeof createLinkSetOverlay>>()
  const get = (id: string) => {
    let n = nodes.get(id)
    if (n === undefined) {
      n = createLinkSetOverlay(id)
      nodes.set(id, n)
    }
    return n
  }
  return {
    node: (id) => get(id).overlay,
    connect(a, b, options) {
      const pair = createMemoryLinkPair(a, b, options)
      get(a).add(pair.a)
      get(b).add(pair.b)
    },
    disconnect(a, b) {
      get(a)
        .overlay.link(b)
        ?.close(new ChannelClosedError(`link ${a} <-> ${b} cut`))
    },
  }
}
