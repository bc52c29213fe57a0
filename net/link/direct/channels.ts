import { Uint8ArrayList } from 'uint8arraylist'
import { AbortError, describeError } from '../../../src/base/errors.ts'
import { encodeFrame } from '../../control/framing.ts'
import type { FramedStream } from '../../control/stream.ts'
import { ChannelBase } from '../channel-base.ts'
import { ChannelClosedError, LinkError, MessageTooLargeError } from '../errors.ts'
import { type ChannelName, MAX_MESSAGE_SIZE, type MessageChannel } from '../interfaces.ts'
import { decodeSwitch, encodeSwitch } from './v1/messages.ts'

/** The peer sent more on the direct stream, before its switch marker, than we are willing to hold. */
export class DirectPathError extends LinkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_DIRECT_PATH' })
  }
}

/** Frames queued in one turn are handed to the stream together once they reach this many bytes. */
export const COALESCE_BYTES = 1024 * 1024

/**
 * A reliable channel over one libp2p stream (tcp + noise + yamux): length-prefixed messages, the
 * stream's own backpressure (send() is false while yamux or the socket wants a drain).
 *
 * Frames sent in one synchronous run (e.g. a holder's batch of BLOCKS) are handed to the stream
 * together in a microtask: yamux then sends them as one data frame, which costs the receiver one
 * window update (a noise message and two socket writes there, measured ~0.5 ms on a busy host)
 * instead of one per message. Order is kept: everything goes through the one queue.
 */
export class StreamChannel extends ChannelBase {
  readonly reliable = true
  protected readonly lowWaterMark = 0
  private pending: Uint8Array[] = []
  private pendingBytes = 0
  private flushQueued = false

  constructor(
    readonly name: ChannelName,
    private readonly framed: FramedStream,
  ) {
    super()
    framed.onEnd((err) => this.markClosed(err))
  }

  private reading = false

  override onMessage(handler: (message: Uint8Array) => void): () => void {
    const off = super.onMessage(handler)
    // FramedStream queues frames until a frame handler is set: set it only once someone listens, so
    // what arrived before (the peer may switch first) is not delivered to nobody.
    if (!this.reading) {
      this.reading = true
      this.framed.onFrame((f) => this.messageListeners.emit(f))
    }
    return off
  }

  get bufferedAmount(): number {
    return this.framed.stream.writeBufferLength + this.pendingBytes
  }

  send(message: Uint8Array): boolean {
    if (this.state === 'closed' || this.framed.isEnded)
      throw new ChannelClosedError(`channel '${this.name}' is closed`)
    if (message.byteLength > MAX_MESSAGE_SIZE)
      throw new MessageTooLargeError(message.byteLength, MAX_MESSAGE_SIZE)
    // A copy (with its length prefix): the caller may reuse its buffer once send() returns.
    const frame = encodeFrame(message, this.framed.maxFrame)
    this.pending.push(frame)
    this.pendingBytes += frame.byteLength
    if (this.pendingBytes >= COALESCE_BYTES) return this.flush()
    if (!this.flushQueued) {
      this.flushQueued = true
      queueMicrotask(() => {
        this.flushQueued = false
        this.flush()
      })
    }
    return !this.framed.stream.writableNeedsDrain
  }

  /** Hands the queued frames to the stream; false when it wants a drain. */
  private flush(): boolean {
    if (this.pending.length === 0) return !this.framed.stream.writableNeedsDrain
    const frames = this.pending
    this.pending = []
    this.pendingBytes = 0
    if (this.framed.isEnded || this.state === 'closed') return false
    try {
      return this.framed.stream.send(frames.length === 1 ? frames[0]! : new Uint8ArrayList(...frames))
    } catch (err) {
      // The stream failed under us (reset, closed for writing): the channel is done.
      this.close(err instanceof Error ? err : new Error(String(err)))
      return false
    }
  }

  override onDrain(options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this.state === 'closed')
      return Promise.reject(new ChannelClosedError(`channel '${this.name}' is closed`))
    if (options.signal?.aborted === true)
      return Promise.reject(new AbortError(undefined, { cause: options.signal.reason }))
    this.flush()
    // The stream, not a byte count, knows when it wants a drain (yamux window or socket full).
    return this.framed.drained(options.signal).catch((err: unknown) => {
      if (this.state === 'closed' || this.framed.isEnded)
        throw new ChannelClosedError(`channel '${this.name}' closed while waiting for drain`, { cause: err })
      throw err
    })
  }

  close(reason?: Error): void {
    if (reason === undefined) this.flush() // a clean close delivers what was sent
    if (!this.markClosed(reason)) return
    this.pending = []
    this.pendingBytes = 0
    if (reason === undefined) void this.framed.close()
    else this.framed.abort(reason)
  }
}

/** How much a peer may send on the direct stream before its old-path messages are all in. */
export const MAX_EARLY_BYTES = 64 * 1024 * 1024

/**
 * A bulk channel that starts on the WebRTC link and moves to a direct stream without reordering or
 * losing a message. Each direction moves on its own: the sender's first message on the direct stream
 * says how many it sent on the old path (v1 switch header); the receiver delivers exactly that many
 * from the old path, then the direct stream, holding what the direct stream brings meanwhile (bounded
 * by MAX_EARLY_BYTES; the sender's drain waits for both paths, so a well-behaved peer stays far below).
 */
export class SwitchableChannel extends ChannelBase {
  readonly reliable = true
  protected readonly lowWaterMark = 0
  private direct: MessageChannel | undefined
  private sentOld = 0
  private recvOld = 0
  /** How many old-path messages the peer sent before switching; undefined until its header came. */
  private switchAt: number | undefined
  private early: Uint8Array[] = []
  private earlyBytes = 0
  private readonly offs: (() => void)[] = []

  constructor(
    readonly name: ChannelName,
    private readonly old: MessageChannel,
    private readonly fail: (err: Error) => void,
  ) {
    super()
    this.offs.push(
      old.onMessage((m) => {
        if (this.switchAt !== undefined && this.recvOld >= this.switchAt) {
          this.fail(new DirectPathError(`'${name}': data on the WebRTC path after the peer switched`))
          return
        }
        this.recvOld++
        this.messageListeners.emit(m)
        if (this.recvOld === this.switchAt) this.flushEarly()
      }),
      old.onClose((reason) => this.markClosed(reason)),
    )
  }

  get bufferedAmount(): number {
    return this.old.bufferedAmount + (this.direct?.bufferedAmount ?? 0)
  }

  /** True once this side sends on the direct stream. */
  get switched(): boolean {
    return this.direct !== undefined
  }

  /** Moves this side's sending to `direct` and starts listening on it. Call once. */
  upgrade(direct: MessageChannel): void {
    if (this.direct !== undefined) throw new DirectPathError(`'${this.name}' is already direct`)
    if (this.state === 'closed') return
    this.offs.push(
      direct.onMessage((m) => {
        if (this.switchAt === undefined) {
          try {
            this.switchAt = decodeSwitch(m)
          } catch (err) {
            this.fail(err as Error)
            return
          }
          if (this.recvOld > this.switchAt)
            this.fail(
              new DirectPathError(
                `'${this.name}': peer switched after ${this.switchAt} messages, ${this.recvOld} came`,
              ),
            )
          return
        }
        if (this.recvOld === this.switchAt) {
          this.messageListeners.emit(m)
          return
        }
        this.earlyBytes += m.byteLength
        if (this.earlyBytes > MAX_EARLY_BYTES) {
          this.fail(
            new DirectPathError(
              `'${this.name}': over ${MAX_EARLY_BYTES} bytes before the WebRTC path caught up`,
            ),
          )
          return
        }
        this.early.push(m)
      }),
      direct.onClose((reason) => {
        const why = reason === undefined ? '' : `: ${describeError(reason)}`
        this.fail(new DirectPathError(`'${this.name}': direct stream closed${why}`, { cause: reason }))
      }),
    )
    direct.send(encodeSwitch(this.sentOld))
    this.direct = direct
  }

  private flushEarly(): void {
    const held = this.early
    this.early = []
    this.earlyBytes = 0
    for (const e of held) this.messageListeners.emit(e)
  }

  send(message: Uint8Array): boolean {
    if (this.state === 'closed') throw new ChannelClosedError(`channel '${this.name}' is closed`)
    if (this.direct !== undefined) return this.direct.send(message)
    const ok = this.old.send(message)
    this.sentOld++ // after send(): a message it refused (too large) was not sent
    return ok
  }

  override onDrain(options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this.state === 'closed')
      return Promise.reject(new ChannelClosedError(`channel '${this.name}' is closed`))
    const closed = () => new ChannelClosedError(`channel '${this.name}' closed while waiting for drain`)
    return new Promise<void>((resolve, reject) => {
      // Our own close must end the wait even if the path we wait on outlives it.
      const offClose = this.closeListeners.add(() => reject(closed()))
      // Right after a switch both paths may hold data: wait for both so the receiver's early buffer
      // stays small.
      const both = async () => {
        await this.old.onDrain(options)
        if (this.direct !== undefined) await this.direct.onDrain(options)
      }
      both().then(
        () => {
          offClose()
          resolve()
        },
        (err: unknown) => {
          offClose()
          reject(this.state === 'closed' ? closed() : err)
        },
      )
    })
  }

  close(reason?: Error): void {
    if (!this.markClosed(reason)) return
    for (const off of this.offs.splice(0)) off()
    this.early = []
  }
}
