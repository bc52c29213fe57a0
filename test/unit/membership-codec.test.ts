import assert from 'node:assert/strict'
import fc from 'fast-check'
import { encodeFrame, FrameDecoder } from '../../net/control/framing.ts'
import {
  decodeAdmitRequest,
  decodeAdmitResponse,
  decodeMembersMessage,
  decodeMembersSync,
  MAX_ADMIT_FRAME,
} from '../../net/control/protocols.ts'

const NAMED = new Set(['FrameTooLargeError', 'ProtocolMessageError'])

describe('control-plane wire decoders', () => {
  it('frames round-trip whatever the chunking', () => {
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ maxLength: 300 }), { maxLength: 10 }),
        fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1, maxLength: 20 }),
        (payloads, cuts) => {
          const wire = Buffer.concat(payloads.map((p) => encodeFrame(p, 1024)))
          const dec = new FrameDecoder(1024)
          const out: Uint8Array[] = []
          let i = 0
          let k = 0
          while (i < wire.length) {
            const n = cuts[k++ % cuts.length]!
            out.push(...dec.push(wire.subarray(i, i + n)))
            i += n
          }
          assert.deepEqual(
            out.map((b) => Buffer.from(b).toString('hex')),
            payloads.map((b) => Buffer.from(b).toString('hex')),
          )
        },
      ),
    )
  })

  it('a length over the limit is refused from the header alone (nothing buffered)', () => {
    const dec = new FrameDecoder(16)
    const header = new Uint8Array([0, 0, 0, 17])
    assert.throws(() => dec.push(header), { name: 'FrameTooLargeError' })
    assert.throws(() => dec.push(new Uint8Array(1)), { name: 'FrameTooLargeError' }, 'stays poisoned')
    assert.throws(() => encodeFrame(new Uint8Array(17), 16), { name: 'FrameTooLargeError' })
  })

  it('fuzz: random bytes through the framer and the message decoders throw only named errors', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 200 }), { maxLength: 8 }), (chunks) => {
        const dec = new FrameDecoder(MAX_ADMIT_FRAME)
        try {
          for (const c of chunks) {
            for (const frame of dec.push(c)) {
              for (const decode of [
                decodeAdmitRequest,
                decodeAdmitResponse,
                decodeMembersMessage,
                decodeMembersSync,
              ]) {
                try {
                  decode(frame)
                } catch (err) {
                  assert.ok(NAMED.has((err as Error).name), (err as Error).message)
                }
              }
            }
          }
        } catch (err) {
          assert.ok(NAMED.has((err as Error).name), (err as Error).message)
        }
      }),
      { numRuns: 500 },
    )
  })

  it('fuzz: JSON-shaped garbage is refused with ProtocolMessageError', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (v) => {
        const frame = new TextEncoder().encode(JSON.stringify(v))
        for (const decode of [
          decodeAdmitRequest,
          decodeAdmitResponse,
          decodeMembersMessage,
          decodeMembersSync,
        ]) {
          try {
            decode(frame)
          } catch (err) {
            assert.equal((err as Error).name, 'ProtocolMessageError', (err as Error).message)
          }
        }
      }),
      { numRuns: 500 },
    )
  })
})
