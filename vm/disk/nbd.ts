/**
 * A small NBD client (fixed newstyle handshake, structured replies, meta contexts): reads, writes,
 * flushes and block status against QEMU's own NBD server (`nbd-server-start` + `block-export-add`).
 *
 * Why hand-written: Debian's well-kept client (libnbd) has no Node binding, and its tools
 * (`nbdinfo --map`, `nbdcopy`) read a whole map or a whole export, not the scattered extents a dirty
 * round needs; spawning one per round adds a process start (~10 ms) to every round and a pipe copy to
 * every byte. This client speaks only what QEMU offers and mesh needs; the system test checks its
 * extents against `nbdinfo --map` on the same export. Every reply is bounded and checked: a
 * malformed one is an NbdError and closes the connection, never an unbounded buffer.
 */
import { connect, type Socket } from 'node:net'
import { MeshError } from '../../src/base/errors.ts'

const NBDMAGIC = 0x4e42444d41474943n
const IHAVEOPT = 0x49484156454f5054n
const REPLY_MAGIC = 0x3e889045565a9n
const REQUEST_MAGIC = 0x25609513
const SIMPLE_REPLY_MAGIC = 0x67446698
const STRUCTURED_REPLY_MAGIC = 0x668e33ef

const OPT_GO = 7
const OPT_STRUCTURED_REPLY = 8
const OPT_SET_META_CONTEXT = 10
const REP_ACK = 1
const REP_INFO = 3
const REP_META_CONTEXT = 4
const INFO_EXPORT = 0

const CMD_READ = 0
const CMD_WRITE = 1
const CMD_DISC = 2
const CMD_FLUSH = 3
const CMD_BLOCK_STATUS = 7

const REPLY_FLAG_DONE = 1
const REPLY_TYPE_NONE = 0
const REPLY_TYPE_OFFSET_DATA = 1
const REPLY_TYPE_OFFSET_HOLE = 2
const REPLY_TYPE_BLOCK_STATUS = 5
const REPLY_TYPE_ERROR = 32769
const REPLY_TYPE_ERROR_OFFSET = 32770

/** Largest single read/write request (QEMU's server accepts up to 32 MiB). */
export const NBD_MAX_REQUEST = 32 * 1024 * 1024
/** Largest option reply or structured chunk accepted besides read data. */
const MAX_REPLY = 1024 * 1024
/**
 * The socket reads into this one buffer (net's `onread`) and the client copies read data straight
 * into each read's target: no Buffer per socket read, and no growing concat of a reply that arrives in
 * many reads (measured: a 4 MiB read arrives in 64 KiB pieces, and concatenating each one onto what
 * came before copied every byte ~32 times; the source agent spent a quarter of its time in GC).
 */
const READ_BUFFER = 256 * 1024

export class NbdError extends MeshError {
  constructor(message: string, options: { cause?: unknown; code?: string } = {}) {
    super(message, { ...options, code: options.code ?? 'E_NBD' })
  }
}

/** One extent of a meta context: `flags` is the context's value (dirty bit, allocation depth...). */
export interface NbdExtent {
  offset: number
  length: number
  flags: number
}

interface Pending {
  kind: 'read' | 'write' | 'flush' | 'status'
  offset: number
  length: number
  /** Read target. */
  buf?: Buffer
  extents?: Map<number, NbdExtent[]>
  resolve: (v: unknown) => void
  reject: (e: Error) => void
  error?: NbdError
}

/** Reads exactly what is asked of a socket, in order (handshake phase). */
class Reader {
  private chunks: Buffer[] = []
  private have = 0
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined
  private failed: Error | undefined
  constructor(private readonly sock: Socket) {}
  /** `b` may be the socket's reused read buffer: kept as a copy. */
  push(b: Buffer): void {
    this.chunks.push(Buffer.from(b))
    this.have += b.length
    this.pump()
  }
  fail(e: Error): void {
    this.failed = e
    const w = this.want
    this.want = undefined
    w?.reject(e)
  }
  /** Bytes received but not consumed (handed to the transmission parser). */
  rest(): Buffer {
    const b = Buffer.concat(this.chunks)
    this.chunks = []
    this.have = 0
    return b
  }
  read(n: number): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed)
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject }
      this.pump()
    })
  }
  private pump(): void {
    const w = this.want
    if (w === undefined || this.have < w.n) return
    const all = Buffer.concat(this.chunks)
    this.chunks = all.length > w.n ? [all.subarray(w.n)] : []
    this.have = all.length - w.n
    this.want = undefined
    w.resolve(all.subarray(0, w.n))
    void this.sock
  }
}

/** An NBD connection to one export. */
export class NbdClient {
  readonly size: number
  /** Context ids by meta context name (only those the server agreed to). */
  readonly contexts: ReadonlyMap<string, number>
  private readonly pending = new Map<bigint, Pending>()
  private cookie = 1n
  /** Received bytes not parsed yet (never a view into the socket's reused read buffer). */
  private buf: Buffer = Buffer.alloc(0)
  /** A read's data chunk whose bytes are still arriving: copied to `p.buf` at `at` as they come. */
  private stream: { p: Pending; cookie: bigint; at: number; left: number; done: boolean } | undefined
  private closed: Error | undefined

  private constructor(
    private readonly sock: Socket,
    size: number,
    contexts: Map<string, number>,
  ) {
    this.size = size
    this.contexts = contexts
  }

  /**
   * Connects to a unix socket (QEMU's NBD server), negotiates structured replies, the meta contexts
   * (e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`) and the export.
   */
  static async connect(
    path: string,
    exportName: string,
    metaContexts: string[] = [],
    timeoutMs = 10_000,
  ): Promise<NbdClient> {
    // Every socket read lands in `readBuf` and goes to `sink`: the handshake's reader, then the client.
    let sink: (b: Buffer) => void = () => {}
    const readBuf = Buffer.allocUnsafe(READ_BUFFER)
    const sock = connect({
      path,
      onread: {
        buffer: readBuf,
        callback: (n: number) => {
          sink(readBuf.subarray(0, n))
          return true
        },
      },
    })
    const reader = new Reader(sock)
    sink = (b) => reader.push(b)
    const onErr = (e: Error) => reader.fail(new NbdError(`NBD ${path}: ${e.message}`, { cause: e }))
    const onClose = () => reader.fail(new NbdError(`NBD ${path}: the server closed the connection`))
    sock.on('error', onErr)
    sock.on('close', onClose)
    const timer = setTimeout(() => {
      reader.fail(new NbdError(`NBD ${path}: no handshake within ${timeoutMs} ms`))
      sock.destroy()
    }, timeoutMs)
    try {
      const hello = await reader.read(18)
      if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT)
        throw new NbdError('not an NBD newstyle server')
      const hflags = hello.readUInt16BE(16)
      if ((hflags & 1) === 0) throw new NbdError('the NBD server is not fixed-newstyle')
      const cflags = Buffer.alloc(4)
      cflags.writeUInt32BE(hflags & 3) // FIXED_NEWSTYLE, NO_ZEROES when offered
      sock.write(cflags)
      const option = (opt: number, data: Buffer) => {
        const h = Buffer.alloc(16)
        h.writeBigUInt64BE(IHAVEOPT, 0)
        h.writeUInt32BE(opt, 8)
        h.writeUInt32BE(data.length, 12)
        sock.write(Buffer.concat([h, data]))
      }
      const reply = async (opt: number): Promise<{ type: number; data: Buffer }> => {
        const h = await reader.read(20)
        if (h.readBigUInt64BE(0) !== REPLY_MAGIC) throw new NbdError('bad option reply magic')
        if (h.readUInt32BE(8) !== opt) throw new NbdError('option reply for another option')
        const type = h.readUInt32BE(12)
        const len = h.readUInt32BE(16)
        if (len > MAX_REPLY) throw new NbdError(`option reply of ${len} bytes`)
        const data = len === 0 ? Buffer.alloc(0) : await reader.read(len)
        if (type >= 0x80000000)
          throw new NbdError(
            `NBD option ${opt} refused (${type - 0x80000000})${data.length > 0 ? `: ${data.toString('utf8')}` : ''}`,
          )
        return { type, data }
      }
      option(OPT_STRUCTURED_REPLY, Buffer.alloc(0))
      if ((await reply(OPT_STRUCTURED_REPLY)).type !== REP_ACK) throw new NbdError('no structured replies')
      const name = Buffer.from(exportName, 'utf8')
      const contexts = new Map<string, number>()
      if (metaContexts.length > 0) {
        const parts = [Buffer.alloc(4), name, Buffer.alloc(4)]
        parts[0]!.writeUInt32BE(name.length)
        parts[2]!.writeUInt32BE(metaContexts.length)
        for (const q of metaContexts) {
          const qb = Buffer.from(q, 'utf8')
          const l = Buffer.alloc(4)
          l.writeUInt32BE(qb.length)
          parts.push(l, qb)
        }
        option(OPT_SET_META_CONTEXT, Buffer.concat(parts))
        for (;;) {
          const r = await reply(OPT_SET_META_CONTEXT)
          if (r.type === REP_ACK) break
          if (r.type === REP_META_CONTEXT && r.data.length >= 4)
            contexts.set(r.data.subarray(4).toString('utf8'), r.data.readUInt32BE(0))
        }
        for (const q of metaContexts)
          if (!contexts.has(q)) throw new NbdError(`the NBD server does not offer meta context '${q}'`)
      }
      const go = Buffer.alloc(4 + name.length + 2)
      go.writeUInt32BE(name.length, 0)
      name.copy(go, 4)
      go.writeUInt16BE(0, 4 + name.length)
      option(OPT_GO, go)
      let size = -1
      for (;;) {
        const r = await reply(OPT_GO)
        if (r.type === REP_ACK) break
        if (r.type === REP_INFO && r.data.length >= 12 && r.data.readUInt16BE(0) === INFO_EXPORT)
          size = Number(r.data.readBigUInt64BE(2))
      }
      if (size < 0) throw new NbdError(`export '${exportName}' has no size`)
      sock.off('error', onErr)
      sock.off('close', onClose)
      const client = new NbdClient(sock, size, contexts)
      sink = (b) => client.feed(b)
      client.attach(reader.rest())
      return client
    } catch (err) {
      sock.destroy()
      throw err instanceof NbdError
        ? err
        : new NbdError(`NBD handshake failed: ${String(err)}`, { cause: err })
    } finally {
      clearTimeout(timer)
    }
  }

  private attach(initial: Buffer): void {
    this.sock.on('error', (e) => this.fail(new NbdError(`NBD connection: ${e.message}`, { cause: e })))
    this.sock.on('close', () => this.fail(new NbdError('NBD connection closed')))
    if (initial.length > 0) this.feed(initial)
  }

  /** Bytes from the socket; `b` is a view into the reused read buffer, so what is kept is copied. */
  private feed(b: Buffer): void {
    if (this.closed !== undefined) return
    try {
      let rest = b
      const s = this.stream
      if (s !== undefined) {
        const n = Math.min(s.left, rest.length)
        rest.copy(s.p.buf!, s.at, 0, n)
        s.at += n
        s.left -= n
        rest = rest.subarray(n)
        if (s.left > 0) return
        this.stream = undefined
        if (s.done) this.complete(s.cookie, s.p)
      }
      if (rest.length === 0) return
      this.buf = this.buf.length === 0 ? rest : Buffer.concat([this.buf, rest])
      this.parse()
      // What is left is part of a reply (a header, a small non-data reply): keep a copy of it.
      if (this.buf.length > 0 && this.buf.buffer === b.buffer) this.buf = Buffer.from(this.buf)
    } catch (err) {
      this.fail(err instanceof NbdError ? err : new NbdError(String(err), { cause: err }))
    }
  }

  private complete(cookie: bigint, p: Pending): void {
    this.pending.delete(cookie)
    if (p.error !== undefined) p.reject(p.error)
    else if (p.kind === 'read') p.resolve(p.buf)
    else if (p.kind === 'status') p.resolve(p.extents)
    else p.resolve(undefined)
  }

  private fail(err: NbdError): void {
    if (this.closed !== undefined) return
    this.closed = err
    this.stream = undefined
    this.buf = Buffer.alloc(0)
    for (const p of this.pending.values()) p.reject(err)
    this.pending.clear()
    this.sock.destroy()
  }

  /** Consumes complete replies from the buffer. */
  private parse(): void {
    for (;;) {
      if (this.buf.length < 4) return
      const magic = this.buf.readUInt32BE(0)
      if (magic === SIMPLE_REPLY_MAGIC) {
        if (this.buf.length < 16) return
        const err = this.buf.readUInt32BE(4)
        const cookie = this.buf.readBigUInt64BE(8)
        const p = this.pending.get(cookie)
        if (p === undefined) throw new NbdError('reply for an unknown request')
        // Simple replies only come for requests without data in structured mode (write, flush) or
        // for errors: a simple read reply would carry data we cannot size safely, so refuse it.
        if (p.kind === 'read' && err === 0) throw new NbdError('simple reply to a read in structured mode')
        this.buf = this.buf.subarray(16)
        this.pending.delete(cookie)
        if (err !== 0) p.reject(new NbdError(`NBD ${p.kind} at ${p.offset} failed: error ${err}`))
        else p.resolve(undefined)
        continue
      }
      if (magic !== STRUCTURED_REPLY_MAGIC) throw new NbdError(`bad reply magic ${magic.toString(16)}`)
      if (this.buf.length < 20) return
      const flags = this.buf.readUInt16BE(4)
      const type = this.buf.readUInt16BE(6)
      const cookie = this.buf.readBigUInt64BE(8)
      const len = this.buf.readUInt32BE(16)
      const p = this.pending.get(cookie)
      if (p === undefined) throw new NbdError('structured reply for an unknown request')
      const limit = p.kind === 'read' ? p.length + 8 : MAX_REPLY
      if (len > limit) throw new NbdError(`structured reply of ${len} bytes`)
      if (type === REPLY_TYPE_OFFSET_DATA && p.kind === 'read') {
        // Read data goes straight to the read's buffer, what has come now and the rest as it comes.
        if (len < 8) throw new NbdError('unexpected data chunk')
        if (this.buf.length < 28) return
        const at = Number(this.buf.readBigUInt64BE(20)) - p.offset
        const n = len - 8
        if (at < 0 || at + n > p.length) throw new NbdError('data chunk outside the read')
        const have = Math.min(n, this.buf.length - 28)
        this.buf.copy(p.buf!, at, 28, 28 + have)
        this.buf = this.buf.subarray(28 + have)
        const done = (flags & REPLY_FLAG_DONE) !== 0
        if (have < n) {
          this.stream = { p, cookie, at: at + have, left: n - have, done }
          return
        }
        if (done) this.complete(cookie, p)
        continue
      }
      if (this.buf.length < 20 + len) return
      const body = this.buf.subarray(20, 20 + len)
      this.buf = this.buf.subarray(20 + len)
      this.chunk(p, type, body)
      if ((flags & REPLY_FLAG_DONE) !== 0) this.complete(cookie, p)
    }
  }

  private chunk(p: Pending, type: number, body: Buffer): void {
    switch (type) {
      case REPLY_TYPE_NONE:
        return
      case REPLY_TYPE_OFFSET_DATA: {
        if (p.kind !== 'read' || body.length < 8) throw new NbdError('unexpected data chunk')
        const at = Number(body.readBigUInt64BE(0)) - p.offset
        const n = body.length - 8
        if (at < 0 || at + n > p.length) throw new NbdError('data chunk outside the read')
        body.copy(p.buf!, at, 8)
        return
      }
      case REPLY_TYPE_OFFSET_HOLE: {
        if (p.kind !== 'read' || body.length !== 12) throw new NbdError('unexpected hole chunk')
        const at = Number(body.readBigUInt64BE(0)) - p.offset
        const n = body.readUInt32BE(8)
        if (at < 0 || at + n > p.length) throw new NbdError('hole chunk outside the read')
        p.buf!.fill(0, at, at + n)
        return
      }
      case REPLY_TYPE_BLOCK_STATUS: {
        if (p.kind !== 'status' || body.length < 4 || (body.length - 4) % 8 !== 0)
          throw new NbdError('unexpected block status chunk')
        const id = body.readUInt32BE(0)
        const list: NbdExtent[] = []
        let off = p.offset
        for (let i = 4; i < body.length; i += 8) {
          const length = body.readUInt32BE(i)
          list.push({ offset: off, length, flags: body.readUInt32BE(i + 4) })
          off += length
        }
        p.extents!.set(id, list)
        return
      }
      case REPLY_TYPE_ERROR:
      case REPLY_TYPE_ERROR_OFFSET: {
        const code = body.length >= 4 ? body.readUInt32BE(0) : 0
        const mlen = body.length >= 6 ? body.readUInt16BE(4) : 0
        const msg = body.subarray(6, 6 + mlen).toString('utf8')
        p.error = new NbdError(`NBD ${p.kind} at ${p.offset} failed: error ${code}${msg ? ` (${msg})` : ''}`)
        return
      }
      default:
        // Unknown chunk types with the error bit are errors; others may be ignored (NBD spec).
        if ((type & 0x8000) !== 0) p.error = new NbdError(`NBD ${p.kind}: error chunk type ${type}`)
    }
  }

  private request(
    kind: Pending['kind'],
    cmd: number,
    offset: number,
    length: number,
    data?: Uint8Array,
  ): Promise<unknown> {
    if (this.closed !== undefined) return Promise.reject(this.closed)
    if (offset < 0 || length < 0 || offset + length > this.size)
      return Promise.reject(new NbdError(`NBD ${kind} ${offset}+${length} outside the export (${this.size})`))
    const cookie = this.cookie++
    const h = Buffer.alloc(28)
    h.writeUInt32BE(REQUEST_MAGIC, 0)
    h.writeUInt16BE(0, 4)
    h.writeUInt16BE(cmd, 6)
    h.writeBigUInt64BE(cookie, 8)
    h.writeBigUInt64BE(BigInt(offset), 16)
    h.writeUInt32BE(length, 24)
    return new Promise((resolve, reject) => {
      const p: Pending = { kind, offset, length, resolve, reject }
      if (kind === 'read') p.buf = Buffer.alloc(length)
      if (kind === 'status') p.extents = new Map()
      this.pending.set(cookie, p)
      this.sock.write(h)
      if (data !== undefined) this.sock.write(data)
    })
  }

  /** Reads `length` bytes at `offset` (holes come back as zeros). */
  async read(offset: number, length: number): Promise<Buffer> {
    if (length > NBD_MAX_REQUEST) throw new NbdError(`read of ${length} bytes is above ${NBD_MAX_REQUEST}`)
    return (await this.request('read', CMD_READ, offset, length)) as Buffer
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (data.byteLength > NBD_MAX_REQUEST)
      throw new NbdError(`write of ${data.byteLength} bytes is too large`)
    await this.request('write', CMD_WRITE, offset, data.byteLength, data)
  }

  async flush(): Promise<void> {
    await this.request('flush', CMD_FLUSH, 0, 0)
  }

  /**
   * The extents of meta context `context` over [offset, offset+length), merged across as many requests
   * as the server needs (it may answer for less than asked).
   */
  async blockStatus(context: string, offset = 0, length = this.size - offset): Promise<NbdExtent[]> {
    const id = this.contexts.get(context)
    if (id === undefined) throw new NbdError(`meta context '${context}' was not negotiated`)
    const out: NbdExtent[] = []
    let at = offset
    const end = offset + length
    while (at < end) {
      const n = Math.min(end - at, 0xffffffff - 0xfffff) // u32, kept cluster-aligned by the server
      const m = (await this.request('status', CMD_BLOCK_STATUS, at, n)) as Map<number, NbdExtent[]>
      const list = m.get(id)
      if (list === undefined || list.length === 0) throw new NbdError(`no extents for '${context}' at ${at}`)
      for (const e of list) {
        if (e.length === 0) throw new NbdError('zero-length extent')
        const len = Math.min(e.length, end - e.offset)
        const last = out.at(-1)
        if (last !== undefined && last.flags === e.flags && last.offset + last.length === e.offset)
          last.length += len
        else out.push({ offset: e.offset, length: len, flags: e.flags })
        at = e.offset + len
        if (at >= end) break
      }
    }
    return out
  }

  /** Ends the session politely (NBD_CMD_DISC) and closes the socket. */
  close(): void {
    if (this.closed !== undefined) return
    const h = Buffer.alloc(28)
    h.writeUInt32BE(REQUEST_MAGIC, 0)
    h.writeUInt16BE(CMD_DISC, 6)
    this.closed = new NbdError('NBD connection closed by us')
    for (const p of this.pending.values()) p.reject(this.closed)
    this.pending.clear()
    this.sock.end(h)
  }
}
