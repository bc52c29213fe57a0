/**
 * The one way to listen to an AbortSignal. Every listener added here is removed again: when the signal
 * fires (it runs once), or when the work that needed it ends and calls the returned function. A listener
 * left on a long-lived signal (the agent's lifetime, a migration) per round, per call or per tick is a
 * leak, and Node warns about it (`MaxListenersExceededWarning: 11 abort listeners`).
 */
import { AbortError } from './errors.ts'

/**
 * Runs `fn(reason)` once when `signal` aborts. A signal that has already aborted runs it in a
 * microtask (never during this call, so `fn` may use the returned function; a plain addEventListener
 * would never run it at all). Returns the function that removes the listener (or cancels that
 * microtask): call it when the work ends; calling it twice is harmless.
 */
export function onAbort(signal: AbortSignal | undefined, fn: (reason: unknown) => void): () => void {
  if (signal === undefined) return () => {}
  if (signal.aborted) {
    let live = true
    queueMicrotask(() => {
      if (live) fn(signal.reason)
    })
    return () => {
      live = false
    }
  }
  const listener = () => fn(signal.reason)
  signal.addEventListener('abort', listener, { once: true })
  return () => signal.removeEventListener('abort', listener)
}

/**
 * A controller that also aborts (with the parent's reason) when `parent` does. `detach()` forgets the
 * parent (call it when the child's work ends); it is also forgotten when the child aborts.
 */
export function linkedController(parent: AbortSignal | undefined): {
  controller: AbortController
  signal: AbortSignal
  detach: () => void
} {
  const controller = new AbortController()
  if (parent?.aborted === true) controller.abort(parent.reason)
  const detach = onAbort(parent, (reason) => controller.abort(reason))
  controller.signal.addEventListener('abort', detach, { once: true })
  return { controller, signal: controller.signal, detach }
}

/**
 * Settles like `promise`, or rejects with an AbortError (cause: the signal's reason) when `signal`
 * aborts first. The listener is removed either way; `promise` itself is not cancelled.
 */
export function abortable<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return promise
  return new Promise<T>((resolve, reject) => {
    const off = onAbort(signal, (reason) => reject(new AbortError(undefined, { cause: reason })))
    promise.then(
      (v) => {
        off()
        resolve(v)
      },
      (e: unknown) => {
        off()
        reject(e)
      },
    )
  })
}

/** Waits `ms`; rejects with an AbortError when `signal` aborts first (timer and listener both removed). */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined
    const off = onAbort(signal, (reason) => {
      clearTimeout(timer)
      reject(new AbortError(undefined, { cause: reason }))
    })
    if (signal?.aborted === true) return
    timer = setTimeout(() => {
      off()
      resolve()
    }, ms)
  })
}
