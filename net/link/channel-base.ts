import { onAbort } from '../../src/base/abort.ts'
import { AbortError } from '../../src/base/errors.ts'
import { ChannelClosedError } from './errors.ts'
import type { ChannelName, ChannelState, MessageChannel } from './interfaces.ts'

type Listener<T extends unknown[]> = (...args: T) => void

/** A set of handlers; a throwing handler never stops delivery to the others (nor the transport). */
export class Listeners<T extends unknown[]> {
  private readonly set = new Set<Listener<T>>()
  add(fn: Listener<T>): () => void {
    this.set.add(fn)
    return () => this.set.delete(fn)
  }
  emit(...args: T): void {
    for (const fn of [...this.set]) {
      try {
        fn(...args)
      } catch {
        // Swallowed on purpose: one handler's bug must not break the channel for the rest.
      }
    }
  }
  clear(): void {
    this.set.clear()
  }
}

/**
 * What every MessageChannel implementation shares: the handler sets, the drain wait (with close and
 * abort, removing its listeners however it ends) and the close bookkeeping. Subclasses carry the bytes
 * and call `drained()` when their buffer falls to the low-water mark.
 */
export abstract class ChannelBase implements MessageChannel {
  abstract readonly name: ChannelName
  abstract readonly reliable: boolean
  abstract readonly bufferedAmount: number
  protected abstract readonly lowWaterMark: number
  state: ChannelState = 'open'
  protected readonly messageListeners = new Listeners<[Uint8Array]>()
  protected readonly closeListeners = new Listeners<[Error | undefined]>()
  protected readonly drainListeners = new Listeners<[]>()

  abstract send(message: Uint8Array): boolean

  onDrain(options: { signal?: AbortSignal } = {}): Promise<void> {
    const { signal } = options
    if (this.state === 'closed')
      return Promise.reject(new ChannelClosedError(`channel '${this.name}' is closed`))
    if (signal?.aborted === true) return Promise.reject(new AbortError(undefined, { cause: signal.reason }))
    if (this.bufferedAmount <= this.lowWaterMark) return Promise.resolve()
    return new Promise<void>((resolve, reject) => {
      const done = () => {
        offDrain()
        offClose()
        offAbort()
      }
      const offDrain = this.drainListeners.add(() => {
        done()
        resolve()
      })
      const offClose = this.closeListeners.add(() => {
        done()
        reject(new ChannelClosedError(`channel '${this.name}' closed while waiting for drain`))
      })
      const offAbort = onAbort(signal, (reason) => {
        done()
        reject(new AbortError(undefined, { cause: reason }))
      })
    })
  }

  onMessage(handler: (message: Uint8Array) => void): () => void {
    return this.messageListeners.add(handler)
  }

  onClose(handler: (reason?: Error) => void): () => void {
    if (this.state === 'closed') {
      queueMicrotask(() => handler())
      return () => {}
    }
    return this.closeListeners.add(handler)
  }

  /** Wakes drain waiters once the buffer is at or below the low-water mark. */
  protected drained(): void {
    if (this.state === 'open' && this.bufferedAmount <= this.lowWaterMark) this.drainListeners.emit()
  }

  /** Marks the channel closed and tells the close handlers, once. Returns false if it already was. */
  protected markClosed(reason?: Error): boolean {
    if (this.state === 'closed') return false
    this.state = 'closed'
    this.closeListeners.emit(reason)
    this.closeListeners.clear()
    this.messageListeners.clear()
    this.drainListeners.clear()
    return true
  }
}
