/**
 * patches/@libp2p+tcp: a send's pieces reach the socket in one writev. noise hands the TCP connection
 * [2-byte length, ciphertext, tag] per 64 KiB frame; stock @libp2p/tcp wrote each piece with its own
 * write(2), and with TCP_NODELAY each small one left as its own segment (through both NATs on the
 * punched path). The patch corks the socket around a send; these tests hold it to order, completeness
 * and backpressure on a real loopback TCP socket.
 */
import '../../net/polyfill.ts'
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { createServer, type Server, type Socket } from 'node:net'
import type { MultiaddrConnection, Upgrader } from '@libp2p/interface'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { Uint8ArrayList } from 'uint8arraylist'

/** libp2p's component logger, silent (its own logger package is not a dependency of ours). */
type Log = (() => void) & { enabled: boolean; error: () => void; trace: () => void; newScope: () => Log }
const silent: Log = Object.assign(() => {}, {
  enabled: false,
  error: () => {},
  trace: () => {},
  newScope: () => silent,
})

interface Dialed {
  maConn: MultiaddrConnection & { socket: Socket }
  server: Server
  peer: Socket
}

/** A plain TCP server on 127.0.0.1 and a libp2p TCP connection to it, not upgraded. */
async function dialRaw(): Promise<Dialed> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as { port: number }).port
  const accepted = once(server, 'connection') as Promise<[Socket]>
  const transport = tcp()({ logger: { forComponent: () => silent } } as never) as unknown as {
    dial(ma: unknown, o: { upgrader: Upgrader; signal: AbortSignal }): Promise<unknown>
  }
  let maConn: Dialed['maConn'] | undefined
  const upgrader = {
    upgradeOutbound: async (c: MultiaddrConnection) => {
      maConn = c as Dialed['maConn']
      return c
    },
  } as unknown as Upgrader
  await transport.dial(multiaddr(`/ip4/127.0.0.1/tcp/${port}`), {
    upgrader,
    signal: new AbortController().signal,
  })
  const [peer] = await accepted
  assert.ok(maConn !== undefined)
  return { maConn, server, peer }
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n)
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff
  return b
}

/** Resolves with everything `peer` received once `bytes` have come. */
function collect(peer: Socket, bytes: number): Promise<Buffer> {
  const got: Buffer[] = []
  let n = 0
  return new Promise((resolve, reject) => {
    peer.on('error', reject)
    peer.on('data', (d: Buffer) => {
      got.push(d)
      n += d.byteLength
      if (n >= bytes) resolve(Buffer.concat(got))
    })
  })
}

describe('libp2p TCP connection: one write per send (patches/@libp2p+tcp)', () => {
  let d: Dialed | undefined
  afterEach(async () => {
    d?.maConn.abort(new Error('test over'))
    d?.peer.destroy()
    d?.server.close()
    d = undefined
  })

  it('hands a send of several pieces to the socket as one writev, bytes in order', async () => {
    d = await dialRaw()
    const sock = d.maConn.socket
    const calls: string[] = []
    const w = sock._write.bind(sock)
    const wv = sock._writev?.bind(sock)
    sock._write = (chunk, enc, cb) => {
      calls.push('write')
      w(chunk, enc, cb)
    }
    sock._writev = (chunks, cb) => {
      calls.push(`writev:${chunks.length}`)
      wv?.(chunks, cb)
    }
    const pieces = [
      pattern(2, 1),
      pattern(65_519, 2),
      pattern(16, 3),
      pattern(2, 4),
      pattern(40_000, 5),
      pattern(16, 6),
    ]
    const total = pieces.reduce((s, p) => s + p.byteLength, 0)
    const got = collect(d.peer, total)
    assert.equal(d.maConn.send(new Uint8ArrayList(...pieces)), true)
    assert.deepEqual(calls, ['writev:6'])
    assert.deepEqual(new Uint8Array(await got), new Uint8Array(Buffer.concat(pieces)))
  })

  it('says when to wait while the peer does not read, and delivers every byte after the drain', async function () {
    this.timeout(30_000)
    d = await dialRaw()
    d.peer.pause()
    const hash = createHash('sha256')
    let sent = 0
    let sends = 0
    // Until the kernel's buffers and the socket's own are full: the connection must say so.
    for (;;) {
      const p = [pattern(4, sends), pattern(256 * 1024, sends + 7)]
      for (const x of p) hash.update(x)
      sent += p[0]!.byteLength + p[1]!.byteLength
      sends++
      if (!d.maConn.send(new Uint8ArrayList(...p))) break
      assert.ok(sent < 512 * 1024 * 1024, 'send() never asked to wait')
    }
    assert.equal(d.maConn.writableNeedsDrain, true)
    const drained = d.maConn.onDrain()
    const got = collect(d.peer, sent)
    d.peer.resume()
    await drained
    const all = await got
    assert.equal(all.byteLength, sent)
    assert.equal(createHash('sha256').update(all).digest('hex'), hash.digest('hex'))
  })
})
