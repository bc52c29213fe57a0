/**
 * The NBD client against a scripted in-process server (a unix socket): reads whose replies arrive in
 * any number of pieces (a data chunk larger than the client's read buffer is copied into the read as
 * it comes), several data and hole chunks in one read, interleaved replies to concurrent reads, error
 * chunks, and malformed replies. The real server (QEMU) is in test/system/vm-disk.test.ts.
 */
import assert from 'node:assert/strict'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { NbdClient } from '../../vm/disk/nbd.ts'

const NBDMAGIC = 0x4e42444d41474943n
const IHAVEOPT = 0x49484156454f5054n
const REPLY_MAGIC = 0x3e889045565a9n
const STRUCTURED = 0x668e33ef
const SIZE = 64 * 1024 * 1024

interface Request {
  cmd: number
  cookie: bigint
  offset: number
  length: number
}

/** One structured reply chunk. */
function chunk(cookie: bigint, type: number, body: Buffer, done: boolean): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(STRUCTURED, 0)
  h.writeUInt16BE(done ? 1 : 0, 4)
  h.writeUInt16BE(type, 6)
  h.writeBigUInt64BE(cookie, 8)
  h.writeUInt32BE(body.length, 16)
  return Buffer.concat([h, body])
}
function dataChunk(cookie: bigint, offset: number, data: Buffer, done: boolean): Buffer {
  const b = Buffer.alloc(8 + data.length)
  b.writeBigUInt64BE(BigInt(offset), 0)
  data.copy(b, 8)
  return chunk(cookie, 1, b, done)
}
function holeChunk(cookie: bigint, offset: number, length: number, done: boolean): Buffer {
  const b = Buffer.alloc(12)
  b.writeBigUInt64BE(BigInt(offset), 0)
  b.writeUInt32BE(length, 8)
  return chunk(cookie, 2, b, done)
}
function errorChunk(cookie: bigint, code: number, msg: string): Buffer {
  const m = Buffer.from(msg)
  const b = Buffer.alloc(6 + m.length)
  b.writeUInt32BE(code, 0)
  b.writeUInt16BE(m.length, 4)
  m.copy(b, 6)
  return chunk(cookie, 32769, b, true)
}

/** The export's bytes: a pattern that differs at every offset. */
function content(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length)
  for (let i = 0; i < length; i++) b[i] = ((offset + i) * 2654435761) >>> 24
  return b
}

/**
 * A fixed-newstyle server with structured replies: answers each request through `answer`, which
 * returns the reply's bytes; `send` writes them (in pieces, to split replies across the client's reads).
 */
async function server(
  path: string,
  answer: (r: Request, all: Request[]) => Buffer[] | undefined,
  pieces: number[],
): Promise<Server> {
  const srv = createServer((sock: Socket) => {
    let buf = Buffer.alloc(0)
    let phase: 'flags' | 'options' | 'requests' = 'flags'
    const seen: Request[] = []
    const send = async (bytes: Buffer) => {
      // Each piece is its own write; the next waits until the socket took it, so pieces often
      // reach the client in separate reads (the kernel may still join them: both must work).
      let at = 0
      let k = 0
      while (at < bytes.length) {
        const n = pieces[k++ % pieces.length]!
        const ok = sock.write(bytes.subarray(at, at + n))
        at += n
        if (!ok) await new Promise((r) => sock.once('drain', r))
        else await new Promise((r) => setImmediate(r))
      }
    }
    let queue = Promise.resolve()
    sock.on('data', (b: Buffer) => {
      buf = Buffer.concat([buf, b])
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return
          buf = buf.subarray(4)
          phase = 'options'
        } else if (phase === 'options') {
          if (buf.length < 16) return
          const opt = buf.readUInt32BE(8)
          const len = buf.readUInt32BE(12)
          if (buf.length < 16 + len) return
          buf = buf.subarray(16 + len)
          const reply = (type: number, data: Buffer) => {
            const h = Buffer.alloc(20)
            h.writeBigUInt64BE(REPLY_MAGIC, 0)
            h.writeUInt32BE(opt, 8)
            h.writeUInt32BE(type, 12)
            h.writeUInt32BE(data.length, 16)
            sock.write(Buffer.concat([h, data]))
          }
          if (opt === 7) {
            const info = Buffer.alloc(12)
            info.writeUInt16BE(0, 0)
            info.writeBigUInt64BE(BigInt(SIZE), 2)
            reply(3, info)
            phase = 'requests'
          }
          reply(1, Buffer.alloc(0))
        } else {
          if (buf.length < 28) return
          const r: Request = {
            cmd: buf.readUInt16BE(6),
            cookie: buf.readBigUInt64BE(8),
            offset: Number(buf.readBigUInt64BE(16)),
            length: buf.readUInt32BE(24),
          }
          buf = buf.subarray(28)
          seen.push(r)
          const out = answer(r, seen)
          if (out !== undefined) for (const o of out) queue = queue.then(() => send(o))
        }
      }
    })
    sock.on('error', () => {})
    const hello = Buffer.alloc(18)
    hello.writeBigUInt64BE(NBDMAGIC, 0)
    hello.writeBigUInt64BE(IHAVEOPT, 8)
    hello.writeUInt16BE(3, 16)
    sock.write(hello)
  })
  await new Promise<void>((r) => srv.listen(path, r))
  return srv
}

/** A read answered as data, hole, data, data (last one done), each part of the content. */
function splitRead(r: Request): Buffer[] {
  const q = Math.floor(r.length / 4)
  return [
    dataChunk(r.cookie, r.offset, content(r.offset, q), false),
    holeChunk(r.cookie, r.offset + q, q, false),
    // Out of order: the spec allows any order of non-overlapping chunks.
    dataChunk(r.cookie, r.offset + 3 * q, content(r.offset + 3 * q, r.length - 3 * q), false),
    dataChunk(r.cookie, r.offset + 2 * q, content(r.offset + 2 * q, q), true),
  ]
}
function expected(r: { offset: number; length: number }): Buffer {
  const q = Math.floor(r.length / 4)
  const b = content(r.offset, r.length)
  b.fill(0, q, 2 * q)
  return b
}

describe('NBD client', () => {
  let dir: string
  let srv: Server | undefined
  let client: NbdClient | undefined
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'mesh-nbd-'))
  })
  afterEach(async () => {
    client?.close()
    client = undefined
    await new Promise((r) => (srv === undefined ? r(undefined) : srv.close(r)))
    srv = undefined
    rmSync(dir, { recursive: true, force: true })
  })

  for (const pieces of [[1, 3, 27, 5], [4096, 7], [1 << 20]]) {
    it(`reads data and hole chunks arriving in pieces of ${pieces.join('/')} bytes`, async function () {
      this.timeout(60_000)
      const path = join(dir, 's')
      srv = await server(path, (r) => (r.cmd === 0 ? splitRead(r) : undefined), pieces)
      client = await NbdClient.connect(path, 'x')
      assert.equal(client.size, SIZE)
      // Small reads with 1-byte pieces (every header split); a 4 MiB read larger than the client's
      // read buffer otherwise.
      const sizes = pieces[0] === 1 ? [4, 4096, 65536] : [4, 65536, 4 * 1024 * 1024 + 12]
      for (const len of sizes) {
        const got = await client.read(8192, len)
        assert.ok(got.equals(expected({ offset: 8192, length: len })), `read of ${len} bytes`)
      }
    })
  }

  it('matches interleaved replies to concurrent reads by cookie', async function () {
    this.timeout(60_000)
    const path = join(dir, 's')
    // Hold the first read's reply until the second arrives, then answer them chunk by chunk,
    // alternating.
    srv = await server(
      path,
      (_r, all) => {
        if (all.length < 2) return undefined
        const [a, b] = all.map(splitRead) as [Buffer[], Buffer[]]
        return [b[0]!, a[0]!, a[1]!, b[1]!, b[2]!, a[2]!, a[3]!, b[3]!]
      },
      [65536 - 5],
    )
    client = await NbdClient.connect(path, 'x')
    const ra = { offset: 0, length: 1024 * 1024 }
    const rb = { offset: 5 * 1024 * 1024, length: 512 * 1024 + 8 }
    const [ga, gb] = await Promise.all([client.read(ra.offset, ra.length), client.read(rb.offset, rb.length)])
    assert.ok(ga.equals(expected(ra)))
    assert.ok(gb.equals(expected(rb)))
  })

  it('rejects a read with an error chunk and keeps the connection', async () => {
    const path = join(dir, 's')
    srv = await server(
      path,
      (r) => (r.offset === 0 ? [errorChunk(r.cookie, 5, 'EIO here')] : splitRead(r)),
      [3],
    )
    client = await NbdClient.connect(path, 'x')
    await assert.rejects(
      client.read(0, 4096),
      (e: Error) => e.name === 'NbdError' && /EIO here/.test(e.message),
    )
    const got = await client.read(4096, 8192)
    assert.ok(got.equals(expected({ offset: 4096, length: 8192 })))
  })

  it('refuses a data chunk outside the read and fails the connection', async () => {
    const path = join(dir, 's')
    srv = await server(path, (r) => [dataChunk(r.cookie, r.offset + 4, content(0, r.length), true)], [
      1 << 20,
    ])
    client = await NbdClient.connect(path, 'x')
    await assert.rejects(
      client.read(0, 300 * 1024),
      (e: Error) => e.name === 'NbdError' && /outside the read/.test(e.message),
    )
    await assert.rejects(client.read(0, 4), (e: Error) => e.name === 'NbdError')
  })

  it('refuses a data chunk larger than the read before taking its bytes', async () => {
    const path = join(dir, 's')
    srv = await server(
      path,
      (r) => [dataChunk(r.cookie, r.offset, content(0, r.length + 4096), true)],
      [4096],
    )
    client = await NbdClient.connect(path, 'x')
    await assert.rejects(
      client.read(0, 8192),
      (e: Error) => e.name === 'NbdError' && /structured reply of/.test(e.message),
    )
  })
})
