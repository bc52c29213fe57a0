import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { connect, createServer } from 'node:net'
import fc from 'fast-check'
import { formatAddr, parseAddr, preparePunch } from '../../net/link/direct/punch.ts'
import { createCongestionControl } from '../../net/node/congestion.ts'
import { bindingRequest, parseBindingResponse, probeTcpMapping } from '../../net/stun/client.ts'
import { buildBindingResponse, StunError, startStunServer } from '../../net/stun/server.ts'
import { SignalDecodeError } from '../../net/webrtc/errors.ts'
import { decodeSignal, encodeSignal } from '../../net/webrtc/v1/messages.ts'
import { createLogger, silentLogger } from '../../src/base/log.ts'

describe('direct path: TCP hole punching pieces', () => {
  it("'punch' signal messages round-trip; a bad address is refused", () => {
    for (const m of [
      { v: 1 as const, session: 'direct', type: 'punch' as const },
      { v: 1 as const, session: 'direct', type: 'punch' as const, addr: '198.51.100.10:40001' },
    ])
      assert.deepEqual(decodeSignal(encodeSignal(m)), m)
    for (const addr of ['1.2.3.4', 'host:80', '1.2.3.4:5:6', 'x'.repeat(30), 7])
      assert.throws(
        () =>
          decodeSignal(new TextEncoder().encode(JSON.stringify({ v: 1, session: 's', type: 'punch', addr }))),
        SignalDecodeError,
      )
  })

  it('parseAddr accepts only IPv4:port and round-trips with formatAddr', () => {
    assert.deepEqual(parseAddr('10.0.0.1:65535'), { address: '10.0.0.1', port: 65535 })
    for (const bad of ['256.1.1.1:1', '1.1.1.1:0', '1.1.1.1:65536', '::1:80', ''])
      assert.equal(parseAddr(bad), undefined)
    fc.assert(
      fc.property(fc.ipV4(), fc.integer({ min: 1, max: 65535 }), (ip, port) => {
        const a = { address: ip, port }
        assert.deepEqual(parseAddr(formatAddr(a)), a)
      }),
    )
  })

  it('parseBindingResponse reads the XOR-MAPPED-ADDRESS and only ever throws StunError', () => {
    const txid = randomBytes(12)
    const res = buildBindingResponse(txid, { address: '203.0.113.7', port: 40123 })
    assert.deepEqual(parseBindingResponse(res, txid), { address: '203.0.113.7', port: 40123 })
    assert.throws(() => parseBindingResponse(res, randomBytes(12)), StunError)
    assert.throws(() => parseBindingResponse(bindingRequest(txid), txid), StunError)
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (b) => {
        try {
          parseBindingResponse(Buffer.from(b), txid)
        } catch (err) {
          assert.ok(err instanceof StunError, String(err))
        }
      }),
    )
  })

  it('STUN over TCP: the responder reports the connection’s source port; the prober learns it', async () => {
    const srv = await startStunServer({ host: '127.0.0.1', port: 0 })
    try {
      const m = await probeTcpMapping({
        server: { address: '127.0.0.1', port: srv.port },
        signal: AbortSignal.timeout(5000),
      })
      assert.equal(m.mapped.address, '127.0.0.1')
      assert.equal(m.mapped.port, m.local.port, 'no NAT on loopback: the mapping keeps the port')
      // The port is free again at once: a punch binds it next.
      const again = await probeTcpMapping({
        server: { address: '127.0.0.1', port: srv.port },
        localPort: m.local.port,
        signal: AbortSignal.timeout(5000),
      })
      assert.equal(again.mapped.port, m.local.port)
      const prep = await preparePunch(
        [{ address: '127.0.0.1', port: srv.port }],
        AbortSignal.timeout(5000),
        5000,
      )
      assert.equal(prep.ok, true)
      // Garbage gets the connection closed, never an answer.
      const reply = await new Promise<Buffer>((resolve) => {
        const chunks: Buffer[] = []
        const c = connect(srv.port, '127.0.0.1', () => c.write(Buffer.alloc(64, 0xff)))
        c.on('data', (d) => chunks.push(d))
        c.on('close', () => resolve(Buffer.concat(chunks)))
        c.on('error', () => {})
      })
      assert.equal(reply.byteLength, 0)
      assert.ok(srv.stats.ignored >= 1)
    } finally {
      await srv.close()
    }
  })

  it('preparePunch: no server, or none answering, means no punch (with the reason)', async () => {
    const none = await preparePunch([], AbortSignal.timeout(1000), 1000)
    assert.equal(none.ok, false)
    const closed = createServer()
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r))
    const port = (closed.address() as { port: number }).port
    await new Promise<void>((r) => closed.close(() => r()))
    const dead = await preparePunch([{ address: '127.0.0.1', port }], AbortSignal.timeout(3000), 1000)
    assert.equal(dead.ok, false)
    assert.match(dead.ok ? '' : dead.why, /TCP STUN failed/)
  })
})

describe('TCP congestion control on the node’s sockets', () => {
  it('sets the wanted algorithm on a TCP socket and reads it back; counts failures', async () => {
    const available = readFileSync('/proc/sys/net/ipv4/tcp_available_congestion_control', 'utf8')
    const algo = available.includes('cubic') ? 'cubic' : available.trim().split(/\s+/)[0]!
    const srv = createServer((s) => s.on('error', () => {}))
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
    const sock = connect((srv.address() as { port: number }).port, '127.0.0.1')
    await new Promise((r) => sock.once('connect', r))
    // A libp2p connection as the congestion module sees it: its maConn holds the net.Socket.
    const conn = { maConn: { socket: sock } } as never
    const logs: string[] = []
    try {
      const cc = createCongestionControl({
        algorithm: algo,
        log: createLogger({ sink: (l) => logs.push(l) }),
      })
      cc.apply(conn)
      assert.equal(cc.current(conn), algo)
      assert.equal(cc.status().applied, 1)
      const bad = createCongestionControl({
        algorithm: 'no-such-cc',
        log: createLogger({ sink: (l) => logs.push(l) }),
      })
      bad.apply(conn)
      bad.apply(conn)
      assert.equal(bad.status().failed, 2)
      assert.match(bad.status().lastError ?? '', /ENOENT/)
      assert.equal(logs.length, 1, 'reported once')
      assert.equal(cc.current(conn), algo, 'a failed set leaves the socket as it was')
      // Relayed connections have no socket: nothing to do, nothing counted.
      cc.apply({ maConn: {} } as never)
      assert.equal(cc.status().applied + cc.status().failed, 1)
      const off = createCongestionControl({ algorithm: false, log: silentLogger })
      off.apply(conn)
      assert.equal(off.status().wanted, undefined)
      assert.equal(off.status().applied, 0)
    } finally {
      sock.destroy()
      srv.close()
    }
  })
})
