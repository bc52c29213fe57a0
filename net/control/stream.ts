import type { Stream } from '@libp2p/interface'
import type { Uint8ArrayList } from 'uint8arraylist'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError } from '../../src/base/errors.ts'
import { ControlTimeoutError, StreamEndedError } from './errors.ts'
import { encodeFrame, FrameDecoder } from './framing.ts'

/**
 * Length-prefixed frames over a libp2p 3 stream, driven by the stream's events.
 *
 * Backpressure: `write()` returns the stream's `send()` result; a caller that must wait uses
 * `drained()`, which listens for the stream's 'drain' EVENT — not `stream.onDrain()`, whose promise is
 * never reset after the first drain in @libp2p/utils 7.4.1 (DESIGN.md), so it would stop waiting.
 */
export class FramedStream {
  private readonly decoder: FrameDecoder
  private readonly queue: Uint8Array[] = []
  private readonly waiters = new Set<{ resolve: (f: Uint8Array) => void; reject: (e: Error) => void }>()
  private handler: ((frame: Uint8Array) => void) | undefined
  private endHandlers = new Set<(err: Error) => void>()
  private ended: Error | undefined

  constructor(
    readonly stream: Stream,
    readonly maxFrame: number,
  ) {
    this.decoder = new FrameDecoder(maxFrame)
    stream.addEventListener('message', (evt) => this.onData(evt.data))
    // 'end' (not 'remoteCloseWrite'): it comes only after everything the remote sent was dispatched.
    // Data that arrived before we listened is dispatched in a microtask, and a remote that writes one
    // message and closes at once must not lose it.
    stream.addEventListener('end', () => this.end(new StreamEndedError('remote closed its end')))
    stream.addEventListener('close', (evt) => {
      if (evt.error !== undefined) this.end(evt.error)
      else setImmediate(() => this.end(new StreamEndedError('stream closed')))
    })
    if (stream.readableEnded) queueMicrotask(() => this.end(new StreamEndedError('remote closed its end')))
  }

  get isEnded(): boolean {
    return this.ended !== undefined
  }

  private onData(data: Uint8Array | Uint8ArrayList): void {
    if (this.ended !== undefined) return
    let frames: Uint8Array[]
    try {
      frames = this.decoder.push(data)
    } catch (err) {
      this.abort(err as Error)
      return
    }
    for (const f of frames) {
      if (this.handler !== undefined) this.handler(f)
      else {
        const w = this.waiters.values().next().value
        if (w !== undefined) {
          this.waiters.delete(w)
          w.resolve(f)
        } else this.queue.push(f)
      }
    }
  }

  private end(err: Error): void {
    if (this.ended !== undefined) return
    this.ended = err
    for (const w of this.waiters) w.reject(err)
    this.waiters.clear()
    for (const h of this.endHandlers) h(err)
    this.endHandlers.clear()
  }

  /** Push mode: every frame (queued ones first) goes to `handler`. */
  onFrame(handler: (frame: Uint8Array) => void): void {
    this.handler = handler
    for (const f of this.queue.splice(0)) handler(f)
  }

  onEnd(handler: (err: Error) => void): () => void {
    if (this.ended !== undefined) {
      const e = this.ended
      queueMicrotask(() => handler(e))
      return () => {}
    }
    this.endHandlers.add(handler)
    return () => this.endHandlers.delete(handler)
  }

  /** Pull mode: the next frame. Rejects with StreamEndedError, ControlTimeoutError or AbortError. */
  read(options: { signal?: AbortSignal; timeoutMs?: number; what?: string } = {}): Promise<Uint8Array> {
    const queued = this.queue.shift()
    if (queued !== undefined) return Promise.resolve(queued)
    if (this.ended !== undefined) return Promise.reject(this.ended)
    const { signal, timeoutMs } = options
    if (signal?.aborted === true) return Promise.reject(new AbortError(undefined, { cause: signal.reason }))
    return new Promise<Uint8Array>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined
      const cleanup = () => {
        this.waiters.delete(w)
        if (timer !== undefined) clearTimeout(timer)
        offAbort()
      }
      const w = {
        resolve: (f: Uint8Array) => {
          cleanup()
          resolve(f)
        },
        reject: (e: Error) => {
          cleanup()
          reject(e)
        },
      }
      const abortNow = () => w.reject(new AbortError(undefined, { cause: signal?.reason }))
      this.waiters.add(w)
      const offAbort = onAbort(signal, abortNow)
      if (timeoutMs !== undefined)
        timer = setTimeout(
          () => w.reject(new ControlTimeoutError(options.what ?? 'waiting for a message')),
          timeoutMs,
        )
    })
  }

  /** Sends one frame; false means the caller should wait for drained() before sending more. */
  write(payload: Uint8Array): boolean {
    if (this.ended !== undefined) throw this.ended
    return this.stream.send(encodeFrame(payload, this.maxFrame))
  }

  /** Resolves on the stream's next 'drain' event (or at once if nothing is waiting to be sent). */
  drained(signal?: AbortSignal): Promise<void> {
    if (!this.stream.writableNeedsDrain) return Promise.resolve()
    if (this.ended !== undefined) return Promise.reject(this.ended)
    return new Promise<void>((resolve, reject) => {
      const cleanup = () => {
        this.stream.removeEventListener('drain', onDrain)
        offEnd()
        offAbort()
      }
      const onDrain = () => {
        cleanup()
        resolve()
      }
      const offEnd = this.onEnd((e) => {
        cleanup()
        reject(e)
      })
      const abortNow = () => {
        cleanup()
        reject(new AbortError(undefined, { cause: signal?.reason }))
      }
      this.stream.addEventListener('drain', onDrain)
      const offAbort = onAbort(signal, abortNow)
    })
  }

  async close(): Promise<void> {
    try {
      await this.stream.close({ signal: AbortSignal.timeout(2000) })
    } catch {
      this.stream.abort(new StreamEndedError('close timed out'))
    }
  }

  abort(err: Error): void {
    this.end(err)
    this.stream.abort(err)
  }
}
