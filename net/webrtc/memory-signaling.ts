import type { Signaling } from './interfaces.ts'
import { decodeSignal, encodeSignal, type SignalMessage } from './v1/messages.ts'

/**
 * Two connected in-process Signaling ends (tests, single-process tools). Messages pass through the
 * wire codec, so what arrives is exactly what a real transport would deliver, asynchronously.
 */
export function createMemorySignalingPair(): { a: Signaling; b: Signaling } {
  const handlers = { a: new Set<(m: SignalMessage) => void>(), b: new Set<(m: SignalMessage) => void>() }
  const end = (self: 'a' | 'b', other: 'a' | 'b'): Signaling => ({
    send(msg) {
      const bytes = encodeSignal(msg)
      setImmediate(() => {
        const decoded = decodeSignal(bytes)
        for (const h of [...handlers[other]]) h(decoded)
      })
    },
    onMessage(handler) {
      handlers[self].add(handler)
      return () => handlers[self].delete(handler)
    },
  })
  return { a: end('a', 'b'), b: end('b', 'a') }
}
