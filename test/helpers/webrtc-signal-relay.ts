/**
 * Test-only signaling rendezvous over TCP (the agent's real one is libp2p). A client's first frame
 * names a room; the relay pairs the first two clients of a room and then forwards bytes between them
 * unchanged. Frames are a 4-byte big-endian length + an encoded v1 signaling message.
 *
 * Run standalone (inside a test namespace): `node --import tsx test/helpers/webrtc-signal-relay.ts HOST PORT`
 * prints `{"listening":PORT}` once it accepts connections.
 */
import { connect, createServer, type Socket } from 'node:net'
import type { Signaling } from '../../net/webrtc/interfaces.ts'
import {
  decodeSignal,
  encodeSignal,
  MAX_SIGNAL_BYTES,
  type SignalMessage,
} from '../../net/webrtc/v1/messages.ts'

function frame(bytes: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(4 + bytes.byteLength)
  b.writeUInt32BE(bytes.byteLength, 0)
  b.set(bytes, 4)
  return b
}

/** Splits a byte stream into frames; destroys the socket on an oversized frame. */
function onFrames(sock: Socket, handler: (f: Buffer) => void): void {
  let buf: Buffer = Buffer.alloc(0)
  sock.on('data', (d: Buffer) => {
    buf = buf.byteLength === 0 ? d : Buffer.concat([buf, d])
    while (buf.byteLength >= 4) {
      const len = buf.readUInt32BE(0)
      if (len > MAX_SIGNAL_BYTES) {
        sock.destroy()
        return
      }
      if (buf.byteLength < 4 + len) break
      const f = buf.subarray(4, 4 + len)
      buf = buf.subarray(4 + len)
      handler(f)
    }
  })
}

export interface SignalRelay {
  port: number
  close(): Promise<void>
}

export async function startSignalRelay(host: string, port = 0): Promise<SignalRelay> {
  const waiting = new Map<string, Socket>()
  const sockets = new Set<Socket>()
  const server = createServer((sock) => {
    sockets.add(sock)
    sock.on('close', () => sockets.delete(sock))
    sock.on('error', () => {})
    let buf: Buffer = Buffer.alloc(0)
    const onHello = (d: Buffer) => {
      buf = Buffer.concat([buf, d])
      if (buf.byteLength < 4) return
      const len = buf.readUInt32BE(0)
      if (len > 256) return sock.destroy()
      if (buf.byteLength < 4 + len) return
      sock.off('data', onHello)
      const room = buf.subarray(4, 4 + len).toString('utf8')
      const rest = buf.subarray(4 + len)
      const other = waiting.get(room)
      if (other === undefined || other.destroyed) {
        waiting.set(room, sock)
        sock.pause()
        if (rest.byteLength > 0) sock.unshift(rest)
        sock.on('close', () => {
          if (waiting.get(room) === sock) waiting.delete(room)
        })
        return
      }
      waiting.delete(room)
      if (rest.byteLength > 0) other.write(rest)
      sock.pipe(other)
      other.pipe(sock)
      other.resume()
      sock.on('close', () => other.destroy())
      other.on('close', () => sock.destroy())
    }
    sock.on('data', onHello)
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => resolve())
  })
  const addr = server.address()
  return {
    port: typeof addr === 'object' && addr !== null ? addr.port : port,
    async close() {
      for (const s of sockets) s.destroy()
      await new Promise<void>((r) => server.close(() => r()))
    },
  }
}

export interface TcpSignaling extends Signaling {
  close(): void
}

/** Connects to the relay and joins `room`; the returned Signaling talks to whoever else joins it. */
export async function connectTcpSignaling(host: string, port: number, room: string): Promise<TcpSignaling> {
  const sock = connect({ host, port })
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', () => resolve())
    sock.once('error', reject)
  })
  sock.on('error', () => {})
  sock.setNoDelay(true)
  sock.write(frame(Buffer.from(room, 'utf8')))
  const handlers = new Set<(m: SignalMessage) => void>()
  onFrames(sock, (f) => {
    let msg: SignalMessage
    try {
      msg = decodeSignal(f)
    } catch {
      return // garbage from the wire is dropped, never thrown into the link
    }
    for (const h of [...handlers]) h(msg)
  })
  return {
    send(msg) {
      if (!sock.destroyed) sock.write(frame(encodeSignal(msg)))
    },
    onMessage(h) {
      handlers.add(h)
      return () => handlers.delete(h)
    },
    close() {
      sock.destroy()
    },
  }
}

if (process.argv[1] !== undefined && import.meta.url.endsWith(process.argv[1].replace(/^.*\//, '/'))) {
  const relay = await startSignalRelay(process.argv[2] ?? '127.0.0.1', Number(process.argv[3] ?? 0))
  process.stdout.write(`${JSON.stringify({ listening: relay.port })}\n`)
  const stop = () => {
    relay.close().finally(() => process.exit(0))
  }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
}
