import assert from 'node:assert/strict'
import fc from 'fast-check'
import { encodeLengthPrefixed, LengthPrefixedReader } from '../../net/tunnel/stream-port.ts'
import {
  ANNOUNCE_BYTES,
  decodeMessage,
  encodeAnnounce,
  encodeMessage,
  formatMac,
  normalizeMac,
  parseMac,
  type TunnelMessage,
} from '../../net/tunnel/v1/frames.ts'

const macArb = fc.uint8Array({ minLength: 6, maxLength: 6 }).map((b) => formatMac(b))
const frameArb = fc.uint8Array({ minLength: 14, maxLength: 1600 })
const messageArb: fc.Arbitrary<TunnelMessage> = fc.oneof(
  frameArb.map((frame) => ({ type: 'frame' as const, frame })),
  frameArb.map((frame) => ({ type: 'forwarded' as const, frame })),
  fc
    .tuple(macArb, fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }))
    .map(([mac, epoch]) => ({ type: 'announce' as const, mac, epoch })),
)

describe('tunnel v1 frames', () => {
  it('round-trips every message type', () => {
    fc.assert(
      fc.property(messageArb, (msg) => {
        const d = decodeMessage(encodeMessage(msg))
        assert.equal(d.ok, true)
        assert.deepEqual(d, { ok: true, ...msg })
      }),
      { numRuns: 500 },
    )
  })

  it('never throws on arbitrary input and rejects what it cannot read (fuzz)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 2000 }), (buf) => {
        const d = decodeMessage(buf)
        if (!d.ok) assert.ok(['short', 'version', 'type', 'length', 'epoch'].includes(d.reason))
        else if (d.type === 'announce') assert.equal(buf.byteLength, ANNOUNCE_BYTES)
        else assert.ok(d.frame.byteLength >= 14)
      }),
      { numRuns: 3000 },
    )
    // Valid headers with mutated bodies: the interesting corner of the input space.
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 5 }), fc.uint8Array({ maxLength: 40 }), (type, body) => {
        const buf = new Uint8Array([1, type, ...body])
        const d = decodeMessage(buf)
        if (d.ok && d.type === 'announce') assert.equal(body.length, 14)
        if (type === 0 || type > 3) assert.deepEqual(d, { ok: false, reason: 'type' })
      }),
      { numRuns: 3000 },
    )
  })

  it('rejects specific malformed messages with the right reason', () => {
    assert.deepEqual(decodeMessage(new Uint8Array([1])), { ok: false, reason: 'short' })
    assert.deepEqual(decodeMessage(new Uint8Array([2, 1, ...new Uint8Array(20)])), {
      ok: false,
      reason: 'version',
    })
    assert.deepEqual(decodeMessage(new Uint8Array([1, 1, ...new Uint8Array(13)])), {
      ok: false,
      reason: 'length',
    })
    const ann = encodeAnnounce('52:54:00:00:00:01', 7)
    assert.deepEqual(decodeMessage(ann.subarray(0, 15)), { ok: false, reason: 'length' })
    const big = ann.slice()
    big.fill(0xff, 8)
    assert.deepEqual(decodeMessage(big), { ok: false, reason: 'epoch' })
    assert.throws(() => encodeAnnounce('52:54:00:00:00:01', -1), RangeError)
    assert.throws(() => parseMac('52:54:00:00:00'), TypeError)
    assert.equal(normalizeMac('52:54:00:AB:cd:0F'), '52:54:00:ab:cd:0f')
  })
})

describe('tunnel QEMU stream framing', () => {
  it('reassembles frames split at any byte boundary', () => {
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ minLength: 1, maxLength: 300 }), { maxLength: 20 }),
        fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1, maxLength: 10 }),
        (frames, cuts) => {
          const stream = Buffer.concat(frames.map((f) => encodeLengthPrefixed(f)))
          const got: Uint8Array[] = []
          const r = new LengthPrefixedReader((f) => got.push(Buffer.from(f)))
          let off = 0
          let i = 0
          while (off < stream.length) {
            const n = cuts[i++ % cuts.length]!
            assert.equal(r.push(stream.subarray(off, off + n)), true)
            off += n
          }
          assert.deepEqual(
            got.map((g) => Buffer.from(g).toString('hex')),
            frames.map((f) => Buffer.from(f).toString('hex')),
          )
        },
      ),
      { numRuns: 300 },
    )
  })

  it('refuses a huge or zero length instead of buffering it', () => {
    const r = new LengthPrefixedReader(() => assert.fail('no frame expected'))
    assert.equal(r.push(Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3])), false)
    const r2 = new LengthPrefixedReader(() => {})
    assert.equal(r2.push(Buffer.from([0, 0, 0, 0])), false)
    const r3 = new LengthPrefixedReader(() => {}, 2000)
    assert.equal(r3.push(Buffer.from([0, 0, 0x07, 0xd1])), false)
  })
})
