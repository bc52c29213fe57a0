import assert from 'node:assert/strict'
import fc from 'fast-check'
import { type ChunkMessage, decode, encode, MAX_HASHES } from '../../net/chunks/v1/messages.ts'

const hash = fc.uint8Array({ minLength: 32, maxLength: 32 })
const hashes = fc.array(hash, { maxLength: 40 })
const req = fc.integer({ min: 0, max: 0xffffffff })

const message: fc.Arbitrary<ChunkMessage> = fc.oneof(
  fc.record({ type: fc.constant('have-query' as const), req, hashes }),
  fc.record({
    type: fc.constant('have-reply' as const),
    req,
    have: fc.array(fc.boolean(), { maxLength: 100 }),
  }),
  fc.record({ type: fc.constant('want' as const), hashes }),
  fc.record({ type: fc.constant('dont-have' as const), hashes }),
  fc.record({ type: fc.constant('cancel' as const), hashes }),
  fc.record({
    type: fc.constant('blocks' as const),
    blocks: fc.array(fc.record({ hash, data: fc.uint8Array({ maxLength: 3000 }) }), { maxLength: 4 }),
  }),
  fc.record({ type: fc.constant('manifest-get' as const), req, id: hash }),
  fc
    .record({
      req,
      found: fc.boolean(),
      data: fc.uint8Array({ maxLength: 500 }),
      pad: fc.integer({ min: 0, max: 1000 }),
    })
    .map(({ req, found, data, pad }) => ({
      type: 'manifest-data' as const,
      req,
      found,
      total: data.byteLength + pad + 7,
      offset: 7,
      data,
    })),
  fc.record({ type: fc.constant('image-query' as const), req, ref: fc.string({ maxLength: 100 }) }),
  fc.record({
    type: fc.constant('image-reply' as const),
    req,
    found: fc.boolean(),
    record: fc.uint8Array({ maxLength: 500 }),
  }),
)

/** Views → plain arrays so Buffer and Uint8Array compare equal. */
function norm(v: unknown): unknown {
  if (v instanceof Uint8Array) return [...v]
  if (Array.isArray(v)) return v.map(norm)
  if (v !== null && typeof v === 'object')
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, norm(x)]))
  return v
}

describe('chunk protocol v1 messages', () => {
  it('every message round-trips', () => {
    fc.assert(
      fc.property(message, (m) => {
        assert.deepEqual(norm(decode(encode(m))), norm(m))
      }),
      { numRuns: 3000 },
    )
  })

  it('random and mutated bytes either decode or throw ChunkProtocolError, never anything else', () => {
    const mutated = fc
      .tuple(
        message,
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }),
        fc.nat(),
      )
      .map(([m, flips, cut]) => {
        const b = Buffer.from(encode(m))
        for (const [at, v] of flips) if (b.byteLength > 0) b[at % b.byteLength] = v
        return cut % 5 === 0 ? b.subarray(0, cut % (b.byteLength + 1)) : b
      })
    fc.assert(
      fc.property(fc.oneof(fc.uint8Array({ maxLength: 200 }), mutated), (bytes) => {
        try {
          decode(bytes)
        } catch (err) {
          assert.equal((err as Error).name, 'ChunkProtocolError', String(err))
        }
      }),
      { numRuns: 5000 },
    )
  })

  it('refuses lists over the limit and unknown versions', () => {
    const b = Buffer.alloc(4)
    b[0] = 1
    b[1] = 3
    b.writeUInt16BE(MAX_HASHES + 1, 2)
    assert.throws(() => decode(b), { name: 'ChunkProtocolError' })
    assert.throws(() => decode(Uint8Array.of(2, 3, 0, 0)), { name: 'ChunkProtocolError' })
    assert.throws(() => encode({ type: 'want', hashes: Array(MAX_HASHES + 1).fill(new Uint8Array(32)) }))
  })
})
