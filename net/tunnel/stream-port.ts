/**
 * A guest NIC as a switch port: the agent is a CLIENT of QEMU's `-netdev stream,server=on` unix socket
 * (QEMU 7.2 as a client never reconnects; as a server it accepts a new client after the old one
 * leaves). Framing both ways: 4-byte big-endian length, then the Ethernet frame.
 */
import { connect, type Socket } from 'node:net'
import type { Logger } from '../../src/base/log.ts'
import { MAX_DECODE_FRAME } from './v1/frames.ts'

/**
 * Splits a byte stream into length-prefixed frames. A length above `maxFrame` cannot come from QEMU
 * (its frames are at most 64 KiB), so it means the stream is out of step or garbage: `push` returns
 * false and the caller resets the connection, instead of waiting to buffer (up to) 4 GiB.
 */
export class LengthPrefixedReader {
  private pending: Buffer[] = []
  private pendingBytes = 0

  constructor(
    private readonly onFrame: (frame: Uint8Array) => void,
    private readonly maxFrame = MAX_DECODE_FRAME,
  ) {}

  /** Feeds bytes; returns false when the stream is corrupt (a length of 0 or above maxFrame). */
  push(chunk: Buffer): boolean {
    let buf: Buffer
    if (this.pendingBytes === 0) buf = chunk
    else {
      this.pending.push(chunk)
      buf = Buffer.concat(this.pending, this.pendingBytes + chunk.byteLength)
      this.pending = []
      this.pendingBytes = 0
    }
    let off = 0
    while (buf.byteLength - off >= 4) {
      const len = buf.readUInt32BE(off)
      if (len === 0 || len > this.maxFrame) return false
      if (buf.byteLength - off - 4 < len) break
      this.onFrame(buf.subarray(off + 4, off + 4 + len))
      off += 4 + len
    }
    if (off < buf.byteLength) {
      // Keep the tail (at most one partial frame + header: bounded by maxFrame + 4).
      const rest = buf.subarray(off)
      this.pending.push(Buffer.from(rest))
      this.pendingBytes = rest.byteLength
    }
    return true
  }

  reset(): void {
    this.pending = []
    this.pendingBytes = 0
  }
}

export function encodeLengthPrefixed(frame: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(4 + frame.byteLength)
  out.writeUInt32BE(frame.byteLength, 0)
  out.set(frame, 4)
  return out
}

export interface StreamPortOptions {
  path: string
  receive: (frame: Uint8Array) => void
  log: Logger
  /** Frames are dropped while this many bytes wait in the socket's write buffer (default 256 KiB). */
  maxQueuedBytes?: number
  /** Reconnect delay bounds, ms (default 50 → 1000, doubling). */
  minRetryMs?: number
  maxRetryMs?: number
}

export interface StreamPort {
  send(frame: Uint8Array): boolean
  connected(): boolean
  close(): Promise<void>
}

/** Connects to QEMU's socket, keeps reconnecting until closed; frames sent while disconnected are dropped. */
export function createStreamPort(o: StreamPortOptions): StreamPort {
  const maxQueued = o.maxQueuedBytes ?? 256 * 1024
  const minRetry = o.minRetryMs ?? 50
  const maxRetry = o.maxRetryMs ?? 1000
  let sock: Socket | undefined
  let up = false
  let closed = false
  let retryMs = minRetry
  let timer: NodeJS.Timeout | undefined
  let everConnected = false

  const dial = () => {
    timer = undefined
    if (closed) return
    const s = connect(o.path)
    sock = s
    const reader = new LengthPrefixedReader(o.receive)
    s.on('connect', () => {
      up = true
      retryMs = minRetry
      if (!everConnected) o.log.debug('connected to QEMU', { path: o.path })
      else o.log.info('reconnected to QEMU', { path: o.path })
      everConnected = true
    })
    s.on('data', (chunk: Buffer) => {
      if (!reader.push(chunk)) {
        o.log.warn('corrupt frame stream from QEMU, reconnecting', { path: o.path })
        s.destroy()
      }
    })
    s.on('error', () => {
      // ENOENT / ECONNREFUSED before QEMU listens, EPIPE when it dies: 'close' follows and retries.
    })
    s.on('close', () => {
      up = false
      if (sock === s) sock = undefined
      if (closed) return
      timer = setTimeout(dial, retryMs)
      retryMs = Math.min(maxRetry, retryMs * 2)
    })
  }
  dial()

  return {
    send(frame) {
      const s = sock
      if (!up || s === undefined || s.writableLength > maxQueued) return false
      s.write(encodeLengthPrefixed(frame))
      return true
    },
    connected: () => up,
    async close() {
      closed = true
      if (timer !== undefined) clearTimeout(timer)
      const s = sock
      sock = undefined
      up = false
      if (s !== undefined && !s.destroyed) {
        await new Promise<void>((resolve) => {
          s.once('close', () => resolve())
          s.destroy()
        })
      }
    },
  }
}
