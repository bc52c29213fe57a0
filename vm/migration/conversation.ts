import { onAbort } from '../../src/base/abort.ts'
import { AbortError } from '../../src/base/errors.ts'
import {
  MigrationAbortedError,
  MigrationLinkError,
  MigrationRefusedError,
  MigrationTimeoutError,
} from './errors.ts'
import type { MigrationChannel } from './interfaces.ts'
import { encodeMessage, type Message, type MessageType } from './v1/messages.ts'

type Of<T extends MessageType> = Extract<Message, { type: T }>

interface Waiter {
  types: readonly MessageType[]
  resolve(m: Message): void
  reject(e: Error): void
}

/**
 * One migration session's view of the channel: sends with backpressure (and counts the bytes), and
 * receives the messages the service routed to this session id, one at a time and in order. Every wait
 * has a timeout and an AbortSignal; a peer's 'abort'/'refuse' or the channel closing fails the wait.
 */
export class Conversation {
  sentBytes = 0
  receivedBytes = 0
  private readonly inbox: Message[] = []
  private waiter: Waiter | undefined
  /** Message types handed to a handler as they come (post-copy traffic beside the main flow). */
  private readonly routes = new Map<MessageType, (m: Message) => void>()
  private failure: Error | undefined
  private readonly failWaiters: Array<(e: Error) => void> = []
  private readonly offClose: () => void

  /** How messages name the peer (its member name when the caller knows it; default its PeerId). */
  readonly peerName: string

  constructor(
    readonly channel: MigrationChannel,
    readonly sid: string,
    peerName?: string,
  ) {
    this.peerName = peerName ?? channel.peer
    this.offClose = channel.onClose((reason) =>
      this.fail(new MigrationLinkError(`link to ${this.peerName} closed`, { cause: reason })),
    )
  }

  get wireBytes(): number {
    return this.sentBytes + this.receivedBytes
  }

  get failed(): Error | undefined {
    return this.failure
  }

  /** Called by the service for each message of this session (already decoded). */
  deliver(m: Message, size: number): void {
    this.receivedBytes += size
    if (m.type === 'abort') {
      this.fail(new MigrationAbortedError(`${this.peerName} aborted the migration: ${m.reason}`))
      return
    }
    if (m.type === 'refuse') {
      this.fail(new MigrationRefusedError(m.reason, { code: m.code }))
      return
    }
    const route = this.routes.get(m.type)
    if (route !== undefined) {
      route(m)
      return
    }
    const w = this.waiter
    if (w?.types.includes(m.type)) {
      this.waiter = undefined
      w.resolve(m)
    } else this.inbox.push(m)
  }

  /**
   * Hands every message of these types to `handler` as it arrives, beside whatever next() waits for
   * (post-copy: page requests and acknowledgements flow while the session waits for 'resumed').
   * Messages of these types already queued are handed over at once. Returns the undo.
   */
  route(types: readonly MessageType[], handler: (m: Message) => void): () => void {
    for (const t of types) this.routes.set(t, handler)
    for (let i = 0; i < this.inbox.length; ) {
      const m = this.inbox[i]!
      if (types.includes(m.type)) {
        this.inbox.splice(i, 1)
        handler(m)
      } else i++
    }
    return () => {
      for (const t of types) if (this.routes.get(t) === handler) this.routes.delete(t)
    }
  }

  /** Resolves (or rejects) when the conversation fails or closes. */
  whenFailed(): Promise<Error> {
    if (this.failure !== undefined) return Promise.resolve(this.failure)
    return new Promise((resolve) => this.failWaiters.push(resolve))
  }

  fail(err: Error): void {
    if (this.failure !== undefined) return
    this.failure = err
    for (const f of this.failWaiters.splice(0)) f(err)
    const w = this.waiter
    this.waiter = undefined
    w?.reject(err)
  }

  close(): void {
    this.offClose()
    this.fail(new MigrationLinkError('session closed'))
  }

  /** Sends one message; waits for the channel to drain when its buffer is full. */
  async send(m: Message, signal?: AbortSignal): Promise<void> {
    if (this.failure !== undefined) throw this.failure
    const bytes = encodeMessage(m)
    this.sentBytes += bytes.byteLength
    let ok: boolean
    try {
      ok = this.channel.send(bytes)
    } catch (cause) {
      throw new MigrationLinkError(`sending to ${this.peerName} failed`, { cause })
    }
    if (!ok) await this.drain(signal)
  }

  /** Sends an already encoded message (see encodeDataMessage). */
  async sendRaw(bytes: Uint8Array, signal?: AbortSignal): Promise<void> {
    if (this.failure !== undefined) throw this.failure
    this.sentBytes += bytes.byteLength
    let ok: boolean
    try {
      ok = this.channel.send(bytes)
    } catch (cause) {
      throw new MigrationLinkError(`sending to ${this.peerName} failed`, { cause })
    }
    if (!ok) await this.drain(signal)
  }

  async drain(signal?: AbortSignal): Promise<void> {
    try {
      await this.channel.drain(signal)
    } catch (cause) {
      if (cause instanceof AbortError) throw cause
      throw this.failure ?? new MigrationLinkError(`link to ${this.peerName} closed`, { cause })
    }
  }

  /** Best effort, never throws: tells the peer why we stop. */
  trySend(m: Message): void {
    try {
      if (this.channel.open) this.channel.send(encodeMessage(m))
    } catch {
      // the link is gone; the peer sees that instead
    }
  }

  /** The next message of one of these types (others that arrive meanwhile stay queued, in order). */
  next<T extends MessageType>(
    types: readonly T[],
    what: string,
    timeoutMs: number,
    signal?: AbortSignal,
  ): Promise<Of<T>> {
    const i = this.inbox.findIndex((m) => (types as readonly MessageType[]).includes(m.type))
    if (i >= 0) return Promise.resolve(this.inbox.splice(i, 1)[0] as Of<T>)
    if (this.failure !== undefined) return Promise.reject(this.failure)
    if (signal?.aborted === true) return Promise.reject(new AbortError(undefined, { cause: signal.reason }))
    if (this.waiter !== undefined) return Promise.reject(new Error('Conversation.next: already waiting'))
    return new Promise<Of<T>>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer)
        offAbort()
      }
      const timer = setTimeout(() => {
        this.waiter = undefined
        done()
        reject(new MigrationTimeoutError(what, timeoutMs))
      }, timeoutMs)
      const abortNow = () => {
        this.waiter = undefined
        done()
        reject(new AbortError(undefined, { cause: signal?.reason }))
      }
      const offAbort = onAbort(signal, abortNow)
      this.waiter = {
        types,
        resolve: (m) => {
          done()
          resolve(m as Of<T>)
        },
        reject: (e) => {
          done()
          reject(e)
        },
      }
    })
  }
}
