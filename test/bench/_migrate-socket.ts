/**
 * A MigrationNetwork over one stream socket (4-byte big-endian length + message), for running the two
 * ends of a migration in separate processes on one machine: each side gets its own event loop and
 * core, as two hosts would. Backpressure is the socket's: write() returning false, then 'drain'.
 */
import type { Socket } from 'node:net'
import { AbortError } from '../../src/base/errors.ts'
import type { MigrationChannel, MigrationNetwork } from '../../vm/migration/interfaces.ts'

const MAX = 1024 * 1024

export function socketNetwork(self: string, peer: string, socket: Socket): MigrationNetwork {
  const handlers = new Set<(m: Uint8Array) => void>()
  const closers = new Set<(e?: Error) => void>()
  let open = true
  let buf: Buffer<ArrayBufferLike> = Buffer.alloc(0)
  socket.setNoDelay(true)
  socket.on('data', (d: Buffer) => {
    buf = buf.length === 0 ? d : Buffer.concat([buf, d])
    while (buf.length >= 4) {
      const n = buf.readUInt32BE(0)
      if (n > MAX) {
        socket.destroy(new Error(`message of ${n} bytes`))
        return
      }
      if (buf.length < 4 + n) break
      const m = buf.subarray(4, 4 + n)
      buf = buf.subarray(4 + n)
      for (const h of handlers) h(m)
    }
  })
  const close = (err?: Error) => {
    if (!open) return
    open = false
    for (const c of [...closers]) c(err)
    closers.clear()
  }
  socket.on('close', () => close())
  socket.on('error', (e) => close(e))
  const ch: MigrationChannel = {
    peer,
    get open() {
      return open
    },
    send(m) {
      if (!open) throw new Error('socket closed')
      const h = Buffer.allocUnsafe(4)
      h.writeUInt32BE(m.byteLength, 0)
      socket.write(h)
      return socket.write(m)
    },
    drain(signal) {
      if (!open) return Promise.reject(new Error('socket closed'))
      if (socket.writableLength === 0 || !socket.writableNeedDrain) return Promise.resolve()
      return new Promise((resolve, reject) => {
        const done = () => {
          socket.off('drain', onDrain)
          closers.delete(onClose)
          signal?.removeEventListener('abort', onAbort)
        }
        const onDrain = () => {
          done()
          resolve()
        }
        const onClose = () => {
          done()
          reject(new Error('socket closed'))
        }
        const onAbort = () => {
          done()
          reject(new AbortError())
        }
        socket.on('drain', onDrain)
        closers.add(onClose)
        signal?.addEventListener('abort', onAbort, { once: true })
      })
    },
    onMessage(h) {
      handlers.add(h)
      return () => handlers.delete(h)
    },
    onClose(h) {
      if (!open) {
        queueMicrotask(() => h())
        return () => {}
      }
      closers.add(h)
      return () => closers.delete(h)
    },
  }
  return {
    self,
    channel: (p) => (p === peer && open ? ch : undefined),
    channels: () => (open ? [ch] : []),
    onChannel: () => () => {},
  }
}
