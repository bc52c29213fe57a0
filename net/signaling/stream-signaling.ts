import type { Stream } from '@libp2p/interface'
import { type Logger, silentLogger } from '../../src/base/log.ts'
import { FramedStream } from '../control/stream.ts'
import type { Signaling, SignalMessage } from '../webrtc/interfaces.ts'
import { decodeSignal, encodeSignal, MAX_SIGNAL_BYTES } from '../webrtc/v1/messages.ts'

/** libp2p protocol carrying one WebRTC link attempt's signaling (one stream per attempt). */
export const SIGNAL_PROTOCOL = '/mesh/signal/1'

/** A peer that does not read its signaling stream cannot make us buffer more than this. */
export const MAX_SIGNAL_BACKLOG = 1024 * 1024

export interface StreamSignaling extends Signaling {
  /** Ends the stream (after the link is up, or when the attempt is abandoned). */
  close(): void
  /** Called once when the stream ends, for whatever reason. */
  onEnd(handler: (err: Error) => void): () => void
  readonly ended: boolean
}

/**
 * The WebRTC link's Signaling over a noise-authenticated libp2p stream (direct or through the relay):
 * the SDP, and so the DTLS fingerprint, is thereby bound to the remote PeerId. Messages are
 * length-prefixed (≤ MAX_SIGNAL_BYTES); a malformed message is dropped and logged, an oversized frame
 * resets the stream (framing is lost). Per the Signaling contract, send() never throws for transport
 * errors: it drops, and the link attempt times out.
 */
export function createStreamSignaling(stream: Stream, options: { log?: Logger } = {}): StreamSignaling {
  const framed = new FramedStream(stream, MAX_SIGNAL_BYTES)
  const handlers = new Set<(msg: SignalMessage) => void>()
  const log = options.log ?? silentLogger
  framed.onFrame((frame) => {
    let msg: SignalMessage
    try {
      msg = decodeSignal(frame)
    } catch (err) {
      log.warn(`signaling: dropped a bad message: ${(err as Error).message}`)
      return
    }
    for (const h of [...handlers]) h(msg)
  })
  return {
    get ended() {
      return framed.isEnded
    },
    send(msg) {
      if (framed.isEnded) return
      try {
        framed.write(encodeSignal(msg))
        // send() keeps accepting data; we only cap what an unresponsive peer makes us hold.
        if (stream.writeBufferLength > MAX_SIGNAL_BACKLOG)
          framed.abort(new Error('signaling peer is not reading'))
      } catch (err) {
        log.warn(`signaling: send failed: ${(err as Error).message}`)
      }
    },
    onMessage(handler) {
      handlers.add(handler)
      return () => handlers.delete(handler)
    },
    onEnd(handler) {
      return framed.onEnd(handler)
    },
    close() {
      handlers.clear()
      void framed.close()
    },
  }
}
