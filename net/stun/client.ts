/**
 * STUN binding over TCP, client side: which public address and port does this host's NAT give a TCP
 * connection from a given local port? Used before TCP hole punching (net/link/direct/punch.ts): a
 * NAT that keeps the local port (Linux masquerade does when it can) maps the punching socket the same
 * way, one that picks a new port per connection (symmetric) makes the mapping unpredictable.
 */
import { randomBytes } from 'node:crypto'
import { connect, type Socket } from 'node:net'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError } from '../../src/base/errors.ts'
import {
  ATTR_MAPPED_ADDRESS,
  ATTR_XOR_MAPPED_ADDRESS,
  BINDING_REQUEST,
  BINDING_SUCCESS,
  MAX_STUN_BYTES,
  parseStunMessage,
  STUN_MAGIC_COOKIE,
  StunError,
} from './server.ts'

export interface TransportAddress {
  readonly address: string
  readonly port: number
}

export interface TcpMapping {
  /** The local end of the probe connection (its port is the one to punch from). */
  readonly local: TransportAddress
  /** What the STUN server saw: the NAT's public address and port for that local port. */
  readonly mapped: TransportAddress
}

export function bindingRequest(transactionId: Buffer): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt16BE(BINDING_REQUEST, 0)
  h.writeUInt16BE(0, 2)
  h.writeUInt32BE(STUN_MAGIC_COOKIE, 4)
  transactionId.copy(h, 8)
  return h
}

/** The (XOR-)MAPPED-ADDRESS of a Binding Success Response for `transactionId` (IPv4 only). */
export function parseBindingResponse(msg: Buffer, transactionId: Buffer): TransportAddress {
  const h = parseStunMessage(msg)
  if (h === undefined) throw new StunError('not a STUN message')
  if (h.type !== BINDING_SUCCESS) throw new StunError(`STUN answer of type 0x${h.type.toString(16)}`)
  if (!h.transactionId.equals(transactionId)) throw new StunError('STUN answer for another transaction')
  let plain: TransportAddress | undefined
  let off = 20
  while (off + 4 <= msg.byteLength) {
    const type = msg.readUInt16BE(off)
    const len = msg.readUInt16BE(off + 2)
    const v = msg.subarray(off + 4, off + 4 + len)
    if ((type === ATTR_XOR_MAPPED_ADDRESS || type === ATTR_MAPPED_ADDRESS) && len === 8 && v[1] === 0x01) {
      let port = v.readUInt16BE(2)
      const ip = [...v.subarray(4, 8)]
      if (type === ATTR_XOR_MAPPED_ADDRESS) {
        port ^= STUN_MAGIC_COOKIE >>> 16
        const cookie = [0x21, 0x12, 0xa4, 0x42]
        for (let i = 0; i < 4; i++) ip[i] = ip[i]! ^ cookie[i]!
        return { address: ip.join('.'), port }
      }
      plain = { address: ip.join('.'), port }
    }
    off += 4 + len + ((4 - (len % 4)) % 4)
  }
  if (plain !== undefined) return plain
  throw new StunError('STUN answer without an IPv4 mapped address')
}

/**
 * Asks a STUN server over TCP for this connection's mapping. `localPort` 0 lets the kernel pick the
 * port (read it from the result). The server closes first, so the local port is free again at once.
 */
export function probeTcpMapping(options: {
  server: TransportAddress
  localPort?: number
  signal: AbortSignal
}): Promise<TcpMapping> {
  const { server, signal } = options
  if (signal.aborted) return Promise.reject(new AbortError(undefined, { cause: signal.reason }))
  const txid = randomBytes(12)
  return new Promise<TcpMapping>((resolve, reject) => {
    let buf = Buffer.alloc(0)
    let local: TransportAddress | undefined
    // An explicit bind (localAddress), even to port 0: libuv then sets SO_REUSEADDR, without which the
    // port could not be bound again (by the punch) while this socket lingers.
    const sock: Socket = connect({
      host: server.address,
      port: server.port,
      localAddress: '0.0.0.0',
      ...(options.localPort ? { localPort: options.localPort } : {}),
    })
    const done = (err: Error | undefined, result?: TcpMapping) => {
      offAbort()
      sock.removeAllListeners('data')
      if (err !== undefined) {
        sock.destroy()
        reject(err)
      } else {
        // Wait for the server's FIN (it closes first; our side then ends without a TIME_WAIT) and for
        // the socket to close, so the port is free for the punch.
        const linger = setTimeout(() => sock.destroy(), 2000) // a server that never closes
        sock.once('close', () => {
          clearTimeout(linger)
          resolve(result!)
        })
        if (sock.readableEnded) sock.end()
        else sock.once('end', () => sock.end())
      }
    }
    const offAbort = onAbort(signal, (reason) => done(new AbortError(undefined, { cause: reason })))
    sock.on('error', (e) =>
      done(new StunError(`STUN over TCP to ${server.address}:${server.port}`, { cause: e })),
    )
    sock.once('connect', () => {
      local = { address: sock.localAddress ?? '', port: sock.localPort ?? 0 }
      sock.write(bindingRequest(txid))
    })
    sock.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk])
      if (buf.byteLength > MAX_STUN_BYTES) return done(new StunError('STUN answer too long'))
      if (buf.byteLength < 20 || buf.byteLength < 20 + buf.readUInt16BE(2)) return
      try {
        const mapped = parseBindingResponse(buf.subarray(0, 20 + buf.readUInt16BE(2)), txid)
        done(undefined, { local: local!, mapped })
      } catch (err) {
        done(err as Error)
      }
    })
  })
}
