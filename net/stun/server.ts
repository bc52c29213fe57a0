/**
 * A STUN binding responder (RFC 5389 §7, §15.2): answers a Binding Request with a Binding Success
 * Response carrying XOR-MAPPED-ADDRESS (and the classic MAPPED-ADDRESS for old clients), which is all
 * ICE needs to learn a server-reflexive candidate. The bootstrap member runs it on UDP 3478.
 *
 * Everything else is ignored without a reply: datagrams shorter than the header or longer than
 * MAX_STUN_BYTES, a wrong magic cookie, a length field that disagrees with the datagram, malformed
 * attributes, methods other than Binding, and indications/responses. A responder that answered
 * garbage could be used to reflect traffic at someone else.
 *
 * Over TCP too (RFC 5389 §7.2.2, same port): one request per connection, answered with the mapping
 * of that TCP connection, then the server closes (so the TIME_WAIT is the server's, and the client can
 * reuse its local port at once). A host learns that way which public address and port its NAT gives a
 * TCP socket, which is what TCP hole punching needs (net/link/direct/punch.ts).
 *
 * Standalone: `node --import tsx net/stun/server.ts [HOST] [PORT]` prints {"listening":PORT}.
 */
import { createSocket, type RemoteInfo, type Socket } from 'node:dgram'
import { createServer, isIPv4, type Server, type Socket as TcpSocket } from 'node:net'
import { onAbort } from '../../src/base/abort.ts'
import { MeshError } from '../../src/base/errors.ts'

export const STUN_MAGIC_COOKIE = 0x2112a442
export const STUN_DEFAULT_PORT = 3478
export const BINDING_REQUEST = 0x0001
export const BINDING_SUCCESS = 0x0101
export const ATTR_MAPPED_ADDRESS = 0x0001
export const ATTR_XOR_MAPPED_ADDRESS = 0x0020
export const ATTR_SOFTWARE = 0x8022
const HEADER = 20
/** Binding requests are small; anything near an MTU is not one we answer. */
export const MAX_STUN_BYTES = 1280

export class StunError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_STUN' })
  }
}

export interface StunHeader {
  type: number
  length: number
  transactionId: Buffer
}

/** Parses and validates a STUN message's framing. Returns undefined for anything that is not a
 *  well-formed STUN message (never throws). */
export function parseStunMessage(msg: Buffer): StunHeader | undefined {
  if (msg.byteLength < HEADER || msg.byteLength > MAX_STUN_BYTES) return undefined
  const type = msg.readUInt16BE(0)
  if ((type & 0xc000) !== 0) return undefined // the two top bits of every STUN message are zero
  const length = msg.readUInt16BE(2)
  if (length % 4 !== 0 || HEADER + length !== msg.byteLength) return undefined
  if (msg.readUInt32BE(4) !== STUN_MAGIC_COOKIE) return undefined
  // Walk the attributes: each TLV must fit, padded to 4 bytes.
  let off = HEADER
  while (off < msg.byteLength) {
    if (off + 4 > msg.byteLength) return undefined
    const alen = msg.readUInt16BE(off + 2)
    off += 4 + alen + ((4 - (alen % 4)) % 4)
    if (off > msg.byteLength) return undefined
  }
  return { type, length, transactionId: Buffer.from(msg.subarray(8, HEADER)) }
}

function attr(type: number, value: Buffer): Buffer {
  const pad = (4 - (value.byteLength % 4)) % 4
  const b = Buffer.alloc(4 + value.byteLength + pad)
  b.writeUInt16BE(type, 0)
  b.writeUInt16BE(value.byteLength, 2)
  value.copy(b, 4)
  return b
}

function ipv4Bytes(address: string): Buffer {
  return Buffer.from(address.split('.').map((x) => Number(x)))
}

function ipv6Bytes(address: string): Buffer {
  const [head, tail] = address.split('::') as [string, string | undefined]
  const parse = (s: string | undefined) => (s ? s.split(':').filter((x) => x !== '') : [])
  let groups = parse(head)
  const tailGroups = parse(tail)
  // An embedded IPv4 tail (::ffff:1.2.3.4) becomes two groups.
  const fix = (g: string[]) =>
    g.flatMap((x) => {
      if (!x.includes('.')) return [x]
      const v = ipv4Bytes(x)
      return [((v[0]! << 8) | v[1]!).toString(16), ((v[2]! << 8) | v[3]!).toString(16)]
    })
  groups = fix(groups)
  const t = fix(tailGroups)
  const fill = tail === undefined ? [] : new Array<string>(8 - groups.length - t.length).fill('0')
  const all = [...groups, ...fill, ...t]
  const b = Buffer.alloc(16)
  all.forEach((g, i) => {
    b.writeUInt16BE(Number.parseInt(g, 16) & 0xffff, i * 2)
  })
  return b
}

/** Builds the Binding Success Response for a request from `from`. */
export function buildBindingResponse(transactionId: Buffer, from: { address: string; port: number }): Buffer {
  const v4 = isIPv4(from.address)
  const addr = v4 ? ipv4Bytes(from.address) : ipv6Bytes(from.address)
  const family = v4 ? 0x01 : 0x02
  const mapped = Buffer.alloc(4 + addr.byteLength)
  mapped[1] = family
  mapped.writeUInt16BE(from.port, 2)
  addr.copy(mapped, 4)
  const xor = Buffer.from(mapped)
  xor.writeUInt16BE(from.port ^ (STUN_MAGIC_COOKIE >>> 16), 2)
  const key = Buffer.alloc(16)
  key.writeUInt32BE(STUN_MAGIC_COOKIE, 0)
  transactionId.copy(key, 4)
  for (let i = 0; i < addr.byteLength; i++) xor[4 + i] = addr[i]! ^ key[i]!
  const body = Buffer.concat([
    attr(ATTR_XOR_MAPPED_ADDRESS, xor),
    attr(ATTR_MAPPED_ADDRESS, mapped),
    attr(ATTR_SOFTWARE, Buffer.from('mesh-stun', 'utf8')),
  ])
  const header = Buffer.alloc(HEADER)
  header.writeUInt16BE(BINDING_SUCCESS, 0)
  header.writeUInt16BE(body.byteLength, 2)
  header.writeUInt32BE(STUN_MAGIC_COOKIE, 4)
  transactionId.copy(header, 8)
  return Buffer.concat([header, body])
}

/** What to answer to one datagram (undefined: stay silent). Pure, for tests and fuzzing. */
export function respond(msg: Buffer, from: { address: string; port: number }): Buffer | undefined {
  const h = parseStunMessage(msg)
  if (h === undefined || h.type !== BINDING_REQUEST) return undefined
  return buildBindingResponse(h.transactionId, from)
}

export interface StunServer {
  readonly address: string
  readonly port: number
  /** Requests answered / datagrams or connections ignored, UDP and TCP together. */
  readonly stats: { requests: number; ignored: number }
  close(): Promise<void>
}

export interface StunServerOptions {
  host?: string
  port?: number
  /** Also answer STUN over TCP on the same port (default true). */
  tcp?: boolean
  signal?: AbortSignal
}

/** A TCP client gets this long to send its one request. */
export const TCP_REQUEST_TIMEOUT_MS = 5000
/** TCP connections served at once; more are closed at once (a STUN request is one small message). */
export const MAX_TCP_CLIENTS = 256

/** Length of the STUN message at the start of `buf` (header + body), or undefined if not known yet. */
function stunLength(buf: Buffer): number | undefined {
  if (buf.byteLength < 4) return undefined
  return HEADER + buf.readUInt16BE(2)
}

function serveTcp(sock: TcpSocket, stats: { requests: number; ignored: number }): void {
  let buf = Buffer.alloc(0)
  sock.setTimeout(TCP_REQUEST_TIMEOUT_MS, () => sock.destroy())
  sock.on('error', () => {}) // a reset by the client is its business
  sock.on('data', (chunk: Buffer) => {
    buf = Buffer.concat([buf, chunk])
    const want = stunLength(buf)
    if (want === undefined) return
    if (want > MAX_STUN_BYTES) {
      stats.ignored++
      sock.destroy()
      return
    }
    if (buf.byteLength < want) return
    const reply =
      sock.remoteAddress === undefined || sock.remotePort === undefined
        ? undefined
        : respond(buf.subarray(0, want), { address: sock.remoteAddress, port: sock.remotePort })
    if (reply === undefined) {
      stats.ignored++
      sock.destroy()
      return
    }
    stats.requests++
    sock.removeAllListeners('data')
    sock.end(reply)
  })
}

export async function startStunServer(options: StunServerOptions = {}): Promise<StunServer> {
  const host = options.host ?? '0.0.0.0'
  const sock: Socket = createSocket({ type: isIPv4(host) || host === '0.0.0.0' ? 'udp4' : 'udp6' })
  const stats = { requests: 0, ignored: 0 }
  sock.on('message', (msg: Buffer, rinfo: RemoteInfo) => {
    const reply = respond(msg, rinfo)
    if (reply === undefined) {
      stats.ignored++
      return
    }
    stats.requests++
    sock.send(reply, rinfo.port, rinfo.address)
  })
  // A send error (e.g. ICMP unreachable reported back) must not kill the responder.
  sock.on('error', () => {})
  await new Promise<void>((resolve, reject) => {
    const onErr = (e: Error) =>
      reject(new StunError(`cannot bind STUN on ${host}:${options.port}`, { cause: e }))
    sock.once('error', onErr)
    sock.bind(options.port ?? STUN_DEFAULT_PORT, host, () => {
      sock.off('error', onErr)
      resolve()
    })
  })
  let tcp: Server | undefined
  const clients = new Set<TcpSocket>()
  if (options.tcp !== false) {
    const server = createServer((c) => {
      clients.add(c)
      c.once('close', () => clients.delete(c))
      serveTcp(c, stats)
    })
    server.maxConnections = MAX_TCP_CLIENTS
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(sock.address().port, host, () => {
          server.off('error', reject)
          resolve()
        })
      })
    } catch (err) {
      sock.close()
      throw new StunError(`cannot listen for STUN over TCP on ${host}:${sock.address().port}`, { cause: err })
    }
    tcp = server
  }
  let closed = false
  const close = () =>
    new Promise<void>((resolve) => {
      if (closed) return resolve()
      closed = true
      offAbort()
      tcp?.close()
      for (const c of clients) c.destroy()
      sock.close(() => resolve())
    })
  const offAbort = onAbort(options.signal, () => {
    close().catch(() => {})
  })
  const a = sock.address()
  return { address: a.address, port: a.port, stats, close }
}

if (
  process.argv[1] !== undefined &&
  import.meta.url.endsWith('/net/stun/server.ts') &&
  process.argv[1].endsWith('server.ts')
) {
  const srv = await startStunServer({
    host: process.argv[2] ?? '0.0.0.0',
    port: Number(process.argv[3] ?? STUN_DEFAULT_PORT),
  })
  process.stdout.write(`${JSON.stringify({ listening: srv.port })}\n`)
  const stop = () => {
    srv.close().finally(() => process.exit(0))
  }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
}
