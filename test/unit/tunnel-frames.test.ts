import assert from 'node:assert/strict'
import fc from 'fast-check'
import { TUNNEL_MESSAGE_BUDGET } from '../../net/tunnel/interfaces.ts'
import { encodeLengthPrefixed, LengthPrefixedReader } from '../../net/tunnel/stream-port.ts'
import {
  ANNOUNCE_BYTES,
  BatchBuilder,
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
  fc
    .array(fc.uint8Array({ minLength: 14, maxLength: 300 }), { minLength: 2, maxLength: 8 })
    .map((frames) => ({ type: 'batch' as const, frames })),
)

/** Every frame of a decoded batch is a ≥ 14-byte view inside the message, and together they cover it. */
function assertBatchWithin(frames: Uint8Array[], buf: Uint8Array): void {
  assert.ok(frames.length >= 2)
  let total = 2
  for (const f of frames) {
    assert.ok(f.byteLength >= 14)
    assert.equal(f.buffer, buf.buffer)
    total += 2 + f.byteLength
  }
  assert.equal(total, buf.byteLength)
}

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
        else if (d.type === 'batch') assertBatchWithin(d.frames, buf)
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
        if (d.ok && d.type === 'batch') assertBatchWithin(d.frames, buf)
        if (type === 0 || type > 4) assert.deepEqual(d, { ok: false, reason: 'type' })
      }),
      { numRuns: 3000 },
    )
    // Batches: valid ones with one byte flipped, truncated or extended must decode to well-formed
    // frames inside the message, or be rejected; never throw.
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ minLength: 14, maxLength: 100 }), { minLength: 2, maxLength: 6 }),
        fc.nat(),
        fc.integer({ min: 0, max: 255 }),
        fc.integer({ min: -20, max: 20 }),
        (frames, at, value, resize) => {
          const enc = encodeMessage({ type: 'batch', frames })
          const buf = new Uint8Array(Math.max(0, enc.byteLength + resize))
          buf.set(enc.subarray(0, buf.byteLength))
          if (buf.byteLength > 2) buf[2 + (at % (buf.byteLength - 2))] = value
          const d = decodeMessage(buf)
          if (d.ok && d.type === 'batch') assertBatchWithin(d.frames, buf)
          else if (!d.ok) assert.ok(['short', 'length'].includes(d.reason))
        },
      ),
      { numRuns: 3000 },
    )
  })

  it('packs small frames into one message within the budget (BatchBuilder)', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ minLength: 14, maxLength: 600 }), { maxLength: 40 }), (frames) => {
        const b = new BatchBuilder(TUNNEL_MESSAGE_BUDGET)
        const out: Uint8Array[] = []
        const take = () => {
          const m = b.take()
          if (m === undefined) return
          assert.ok(m.byteLength <= TUNNEL_MESSAGE_BUDGET, `message of ${m.byteLength} bytes`)
          const d = decodeMessage(m)
          assert.equal(d.ok, true)
          if (d.ok && d.type === 'frame') out.push(d.frame.slice())
          else if (d.ok && d.type === 'batch') out.push(...d.frames.map((f) => f.slice()))
          else assert.fail(`unexpected ${JSON.stringify(d)}`)
        }
        for (const f of frames) {
          if (!b.add(f)) {
            take()
            assert.equal(b.add(f), true, 'an empty builder takes any frame up to the budget')
          }
        }
        take()
        assert.equal(b.take(), undefined)
        assert.deepEqual(
          out.map((f) => Buffer.from(f).toString('hex')),
          frames.map((f) => Buffer.from(f).toString('hex')),
        )
      }),
      { numRuns: 500 },
    )
    const b = new BatchBuilder(100)
    assert.equal(b.add(new Uint8Array(13)), false, 'runt')
    assert.equal(b.add(new Uint8Array(97)), false, 'over budget')
    assert.equal(b.add(new Uint8Array(96)), true)
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
    const f14 = new Uint8Array(14).fill(7)
    // A batch of one, a runt entry, a truncated entry, a dangling length byte.
    assert.deepEqual(decodeMessage(new Uint8Array([1, 4, 0, 14, ...f14])), { ok: false, reason: 'length' })
    assert.deepEqual(decodeMessage(new Uint8Array([1, 4, 0, 14, ...f14, 0, 13, ...f14.subarray(1)])), {
      ok: false,
      reason: 'length',
    })
    assert.deepEqual(decodeMessage(new Uint8Array([1, 4, 0, 14, ...f14, 0, 15, ...f14])), {
      ok: false,
      reason: 'length',
    })
    assert.deepEqual(decodeMessage(new Uint8Array([1, 4, 0, 14, ...f14, 0, 14, ...f14, 0])), {
      ok: false,
      reason: 'length',
    })
    assert.deepEqual(decodeMessage(new Uint8Array([1, 4])), { ok: false, reason: 'length' })
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
