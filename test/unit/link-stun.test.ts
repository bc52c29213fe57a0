import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { createSocket } from 'node:dgram'
import fc from 'fast-check'
import {
  ATTR_XOR_MAPPED_ADDRESS,
  buildBindingResponse,
  parseStunMessage,
  respond,
  STUN_MAGIC_COOKIE,
  startStunServer,
} from '../../net/stun/server.ts'

/** A Binding Request as a client would build it, by hand (RFC 5389 §6). */
function bindingRequest(txid: Buffer, attrs: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt16BE(0x0001, 0)
  h.writeUInt16BE(attrs.byteLength, 2)
  h.writeUInt32BE(STUN_MAGIC_COOKIE, 4)
  txid.copy(h, 8)
  return Buffer.concat([h, attrs])
}

/** Decodes XOR-MAPPED-ADDRESS from a response (IPv4 only). */
function xorMapped(res: Buffer): { address: string; port: number } {
  let off = 20
  while (off + 4 <= res.byteLength) {
    const type = res.readUInt16BE(off)
    const len = res.readUInt16BE(off + 2)
    if (type === ATTR_XOR_MAPPED_ADDRESS) {
      const v = res.subarray(off + 4, off + 4 + len)
      assert.equal(v[1], 0x01, 'IPv4 family')
      const port = v.readUInt16BE(2) ^ (STUN_MAGIC_COOKIE >>> 16)
      const cookie = Buffer.alloc(4)
      cookie.writeUInt32BE(STUN_MAGIC_COOKIE)
      const address = [0, 1, 2, 3].map((i) => v[4 + i]! ^ cookie[i]!).join('.')
      return { address, port }
    }
    off += 4 + len + ((4 - (len % 4)) % 4)
  }
  throw new Error('no XOR-MAPPED-ADDRESS')
}

describe('STUN binding responder', function () {
  this.timeout(20_000)

  it('answers a hand-built Binding Request with the XOR-mapped source address', () => {
    const txid = randomBytes(12)
    const res = respond(bindingRequest(txid), { address: '203.0.113.7', port: 40000 })!
    assert.ok(res)
    assert.equal(res.readUInt16BE(0), 0x0101, 'Binding Success Response')
    assert.equal(res.readUInt16BE(2), res.byteLength - 20)
    assert.equal(res.readUInt32BE(4), STUN_MAGIC_COOKIE)
    assert.deepEqual(res.subarray(8, 20), txid, 'same transaction id')
    assert.deepEqual(xorMapped(res), { address: '203.0.113.7', port: 40000 })
    // Known vector: port 40000 ^ 0x2112 and 203.0.113.7 ^ 0x2112a442.
    const x = res.subarray(24, 32)
    assert.equal(x.readUInt16BE(2), 40000 ^ 0x2112)
    assert.equal(x.readUInt32BE(4), (((203 << 24) | (113 << 8) | 7) ^ STUN_MAGIC_COOKIE) >>> 0)
  })

  it('handles IPv6 sources', () => {
    const res = buildBindingResponse(randomBytes(12), { address: '2001:db8::1', port: 5 })
    assert.equal(res.readUInt16BE(2), res.byteLength - 20)
    assert.equal(res[25], 0x02)
  })

  it('accepts requests with attributes and ignores everything that is not a valid Binding Request', () => {
    const txid = randomBytes(12)
    const software = Buffer.from([0x80, 0x22, 0x00, 0x03, 0x61, 0x62, 0x63, 0x00])
    assert.ok(respond(bindingRequest(txid, software), { address: '1.2.3.4', port: 1 }))
    const from = { address: '1.2.3.4', port: 1 }
    const good = bindingRequest(txid)
    const badCookie = Buffer.from(good)
    badCookie.writeUInt32BE(0xdeadbeef, 4)
    const badLength = Buffer.from(good)
    badLength.writeUInt16BE(4, 2)
    const indication = Buffer.from(good)
    indication.writeUInt16BE(0x0011, 0)
    const response = Buffer.from(good)
    response.writeUInt16BE(0x0101, 0)
    const topBits = Buffer.from(good)
    topBits.writeUInt16BE(0xc001, 0)
    const truncatedAttr = bindingRequest(txid, Buffer.from([0x80, 0x22, 0x00, 0x10, 0, 0, 0, 0]))
    for (const m of [
      badCookie,
      badLength,
      indication,
      response,
      topBits,
      truncatedAttr,
      good.subarray(0, 19),
      Buffer.alloc(2000),
    ]) {
      assert.equal(respond(m, from), undefined)
    }
  })

  it('never throws on arbitrary datagrams', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 1500 }), fc.boolean(), (b, cookie) => {
        const buf = Buffer.from(b)
        if (cookie && buf.byteLength >= 8) buf.writeUInt32BE(STUN_MAGIC_COOKIE, 4)
        parseStunMessage(buf)
        respond(buf, { address: '1.2.3.4', port: 9 })
      }),
      { numRuns: 2000 },
    )
  })

  it('serves over UDP and survives garbage', async () => {
    const srv = await startStunServer({ host: '127.0.0.1', port: 0 })
    const client = createSocket('udp4')
    try {
      await new Promise<void>((r) => client.bind(0, '127.0.0.1', () => r()))
      const got = new Promise<Buffer>((resolve) => client.once('message', (m) => resolve(m)))
      client.send(Buffer.from('garbage'), srv.port, '127.0.0.1')
      client.send(Buffer.alloc(5000), srv.port, '127.0.0.1')
      const txid = randomBytes(12)
      client.send(bindingRequest(txid), srv.port, '127.0.0.1')
      const res = await got
      assert.deepEqual(res.subarray(8, 20), txid)
      assert.deepEqual(xorMapped(res), { address: '127.0.0.1', port: client.address().port })
      assert.equal(srv.stats.requests, 1)
      assert.ok(srv.stats.ignored >= 1)
    } finally {
      client.close()
      await srv.close()
    }
  })

  it('werift gathers a server-reflexive candidate through it', async function () {
    const { RTCPeerConnection } = await import('werift')
    // Bind the STUN server on the non-loopback address so werift's host socket can reach it; on this
    // machine's single namespace the srflx address equals the host address, which is what a STUN
    // server without NAT in between reports.
    const { networkInterfaces } = await import('node:os')
    const addr = Object.values(networkInterfaces())
      .flat()
      .find((i) => i !== undefined && i.family === 'IPv4' && !i.internal)?.address
    if (addr === undefined) return this.skip()
    const srv = await startStunServer({ host: addr, port: 0 })
    const pc = new RTCPeerConnection({
      iceServers: [{ urls: `stun:${addr}:${srv.port}` }],
      iceUseIpv6: false,
    })
    try {
      pc.createDataChannel('x', { negotiated: true, id: 0 })
      await pc.setLocalDescription(await pc.createOffer())
      await new Promise<void>((resolve) => {
        if (pc.iceGatheringState === 'complete') return resolve()
        pc.iceGatheringStateChange.subscribe((s) => {
          if (s === 'complete') resolve()
        })
      })
      const sdp = pc.localDescription!.sdp
      assert.match(sdp, /typ srflx raddr/, sdp)
      assert.ok(srv.stats.requests >= 1)
    } finally {
      await pc.close()
      await srv.close()
    }
  })
})
