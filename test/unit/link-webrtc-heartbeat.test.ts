import assert from 'node:assert/strict'
import fc from 'fast-check'
import {
  decodeHeartbeat,
  encodeHeartbeat,
  HEARTBEAT_BYTES,
  HEARTBEAT_KINDS,
  type Heartbeat,
  MAX_HEARTBEAT_BYTES,
} from '../../net/webrtc/v1/heartbeat.ts'

const heartbeat: fc.Arbitrary<Heartbeat> = fc.record({
  kind: fc.constantFrom('ping' as const, 'pong' as const, 'bye' as const),
  seq: fc.integer({ min: 0, max: 0xffffffff }),
})

describe('webrtc link heartbeat v1', () => {
  it('round-trips every valid message in 5 bytes', () => {
    fc.assert(
      fc.property(heartbeat, (hb) => {
        const b = encodeHeartbeat(hb)
        assert.equal(b.byteLength, HEARTBEAT_BYTES)
        assert.deepEqual(decodeHeartbeat(b), { ...hb })
      }),
      { numRuns: 500 },
    )
  })

  it('keeps the wire form both engines and older agents speak: u8 kind, u32 big-endian seq', () => {
    assert.deepEqual([...encodeHeartbeat({ kind: 'ping', seq: 0x01020304 })], [1, 1, 2, 3, 4])
    assert.deepEqual([...encodeHeartbeat({ kind: 'pong', seq: 0xffffffff })], [2, 255, 255, 255, 255])
    assert.deepEqual([...encodeHeartbeat({ kind: 'bye', seq: 0 })], [3, 0, 0, 0, 0])
    assert.deepEqual(HEARTBEAT_KINDS, { ping: 1, pong: 2, bye: 3 })
  })

  it('only ever throws HeartbeatDecodeError on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2 * MAX_HEARTBEAT_BYTES }), (b) => {
        try {
          const hb = decodeHeartbeat(b)
          // Whatever decodes re-encodes to the same bytes: nothing is accepted loosely.
          assert.deepEqual(encodeHeartbeat(hb), b)
        } catch (err) {
          assert.equal((err as Error).name, 'HeartbeatDecodeError')
        }
      }),
      { numRuns: 2000 },
    )
  })

  it('decodes from a view into a larger buffer (as engines deliver it)', () => {
    fc.assert(
      fc.property(heartbeat, fc.nat(32), fc.nat(32), (hb, before, after) => {
        const buf = new Uint8Array(before + HEARTBEAT_BYTES + after).fill(0xee)
        buf.set(encodeHeartbeat(hb), before)
        assert.deepEqual(decodeHeartbeat(buf.subarray(before, before + HEARTBEAT_BYTES)), { ...hb })
      }),
      { numRuns: 300 },
    )
  })

  it('enforces the limits', () => {
    assert.throws(() => decodeHeartbeat(new Uint8Array(0)), { name: 'HeartbeatDecodeError' })
    assert.throws(() => decodeHeartbeat(new Uint8Array(4).fill(1)), /4 bytes, want 5/)
    assert.throws(() => decodeHeartbeat(new Uint8Array(6).fill(1)), /6 bytes, want 5/)
    assert.throws(() => decodeHeartbeat(new Uint8Array(MAX_HEARTBEAT_BYTES + 1)), /over 64/)
    assert.throws(() => decodeHeartbeat(new Uint8Array([0, 0, 0, 0, 1])), /unknown kind 0/)
    assert.throws(() => decodeHeartbeat(new Uint8Array([4, 0, 0, 0, 1])), /unknown kind 4/)
    assert.throws(() => encodeHeartbeat({ kind: 'ping', seq: -1 }), { name: 'HeartbeatDecodeError' })
    assert.throws(() => encodeHeartbeat({ kind: 'ping', seq: 2 ** 32 }), { name: 'HeartbeatDecodeError' })
    assert.throws(() => encodeHeartbeat({ kind: 'ping', seq: 1.5 }), { name: 'HeartbeatDecodeError' })
    for (const kind of ['nope', 'constructor', 'toString'])
      assert.throws(() => encodeHeartbeat({ kind: kind as 'ping', seq: 1 }), { name: 'HeartbeatDecodeError' })
  })
})
