import assert from 'node:assert/strict'
import fc from 'fast-check'
import {
  decodeSignal,
  encodeSignal,
  MAX_SDP_LENGTH,
  MAX_SIGNAL_BYTES,
  type SignalMessage,
  validateSignal,
} from '../../net/webrtc/v1/messages.ts'

const session = fc.stringMatching(/^[A-Za-z0-9_-]{1,64}$/)
const message: fc.Arbitrary<SignalMessage> = fc.oneof(
  fc.record({
    v: fc.constant(1 as const),
    session,
    type: fc.constant('offer' as const),
    sdp: fc.string({ minLength: 1, maxLength: 2000 }),
  }),
  fc.record({
    v: fc.constant(1 as const),
    session,
    type: fc.constant('answer' as const),
    sdp: fc.string({ minLength: 1, maxLength: 2000 }),
  }),
  fc.record(
    {
      v: fc.constant(1 as const),
      session,
      type: fc.constant('candidate' as const),
      candidate: fc.string({ maxLength: 1024 }),
      sdpMid: fc.string({ maxLength: 64 }),
      sdpMLineIndex: fc.integer({ min: 0, max: 255 }),
    },
    { requiredKeys: ['v', 'session', 'type', 'candidate'] },
  ),
  fc.record({ v: fc.constant(1 as const), session, type: fc.constant('end-of-candidates' as const) }),
  fc.record(
    {
      v: fc.constant(1 as const),
      session,
      type: fc.constant('bye' as const),
      reason: fc.string({ maxLength: 256 }),
    },
    { requiredKeys: ['v', 'session', 'type'] },
  ),
)

const bytes = (s: string) => new TextEncoder().encode(s)

describe('webrtc signaling messages v1', () => {
  it('round-trips every valid message', () => {
    fc.assert(
      fc.property(message, (m) => {
        assert.deepEqual(decodeSignal(encodeSignal(m)), { ...m })
      }),
      { numRuns: 500 },
    )
  })

  it('only ever throws SignalDecodeError on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 512 }), (b) => {
        try {
          decodeSignal(b)
        } catch (err) {
          assert.equal((err as Error).name, 'SignalDecodeError')
        }
      }),
      { numRuns: 1000 },
    )
  })

  it('only ever throws SignalDecodeError on arbitrary JSON values', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        try {
          const m = validateSignal(v)
          assert.equal(m.v, 1)
        } catch (err) {
          assert.equal((err as Error).name, 'SignalDecodeError')
        }
      }),
      { numRuns: 1000 },
    )
  })

  it('survives mutations of valid messages (wrong types, missing fields)', () => {
    const values = fc.oneof(
      fc.constant(undefined),
      fc.constant(null),
      fc.integer(),
      fc.string(),
      fc.array(fc.integer()),
      fc.object(),
    )
    fc.assert(
      fc.property(
        message,
        fc.constantFrom('v', 'session', 'type', 'sdp', 'candidate', 'sdpMid', 'sdpMLineIndex', 'reason'),
        values,
        (m, key, val) => {
          const mutated = { ...m, [key]: val } as Record<string, unknown>
          try {
            validateSignal(mutated)
          } catch (err) {
            assert.equal((err as Error).name, 'SignalDecodeError')
          }
        },
      ),
      { numRuns: 1000 },
    )
  })

  it('enforces the limits', () => {
    const big = 'x'.repeat(MAX_SDP_LENGTH + 1)
    assert.throws(() => validateSignal({ v: 1, session: 's', type: 'offer', sdp: big }), {
      name: 'SignalDecodeError',
    })
    assert.throws(() => decodeSignal(new Uint8Array(MAX_SIGNAL_BYTES + 1)), { name: 'SignalDecodeError' })
    assert.throws(() => validateSignal({ v: 2, session: 's', type: 'bye' }), /unsupported version/)
    assert.throws(() => validateSignal({ v: 1, session: 'a b', type: 'bye' }), /session/)
    assert.throws(() => validateSignal({ v: 1, session: 's', type: 'offer', sdp: '' }), /empty sdp/)
    assert.throws(
      () => validateSignal({ v: 1, session: 's', type: 'candidate', candidate: 'c', sdpMLineIndex: 1.5 }),
      {
        name: 'SignalDecodeError',
      },
    )
    assert.throws(() => decodeSignal(new Uint8Array([0xff, 0xfe])), { name: 'SignalDecodeError' })
    assert.throws(() => decodeSignal(bytes('[1,2]')), { name: 'SignalDecodeError' })
    assert.throws(() => encodeSignal({ v: 1, session: 's', type: 'offer', sdp: big }), {
      name: 'SignalDecodeError',
    })
  })

  it('ignores unknown fields (forward compatible) without copying them', () => {
    const m = decodeSignal(
      bytes(JSON.stringify({ v: 1, session: 'abc', type: 'bye', extra: 'x'.repeat(100) })),
    )
    assert.deepEqual(m, { v: 1, session: 'abc', type: 'bye' })
  })
})
