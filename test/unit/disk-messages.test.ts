import assert from 'node:assert/strict'
import fc from 'fast-check'
import { extentsToChunks } from '../../vm/disk/tracker.ts'
import {
  DISK_HASH_SIZE,
  type DiskMessage,
  decodeDiskMessage,
  encodeDiskMessage,
  FLAG_DEFLATED,
  FLAG_ZERO,
} from '../../vm/disk/v1/messages.ts'
import {
  decodeMessage,
  encodeDiskInPlace,
  encodeMessage,
  HEADER_SIZE,
  MAX_WIRE_MESSAGE,
} from '../../vm/migration/v1/messages.ts'

const decodeError = (err: Error) => err.name === 'MigrationDecodeError'

describe('disk stream messages (v1)', () => {
  it('round-trips every kind, inside the migration protocol too', () => {
    const msgs: DiskMessage[] = [
      { kind: 'info', size: 3 * 1024 ** 3, chunkSize: 65536 },
      { kind: 'offer', batch: 2, indices: [0, 7, 9], hashes: Buffer.alloc(3 * DISK_HASH_SIZE, 0xab) },
      { kind: 'want', batch: 2, indices: [7] },
      {
        kind: 'data',
        round: 3,
        chunks: [
          { index: 1, flags: FLAG_ZERO, data: new Uint8Array(0) },
          { index: 2, flags: FLAG_DEFLATED, data: Buffer.from('xyz') },
          { index: 3, flags: 0, data: Buffer.alloc(65536, 1) },
        ],
      },
      { kind: 'seed', seeded: true },
      { kind: 'seed', seeded: false },
    ]
    for (const m of msgs) {
      const back = decodeDiskMessage(encodeDiskMessage(m))
      assert.equal(back.kind, m.kind)
      assert.deepEqual(Buffer.from(encodeDiskMessage(back)), Buffer.from(encodeDiskMessage(m)))
      const wire = decodeMessage(
        encodeMessage({ type: 'disk', sid: '0123456789abcdef', body: encodeDiskMessage(m) }),
      )
      assert.equal(wire.type, 'disk')
      if (wire.type === 'disk') assert.deepEqual(Buffer.from(wire.body), Buffer.from(encodeDiskMessage(m)))
      // Built in place behind the header (the source's path): the same bytes on the wire.
      const sid = 'fedcba9876543210'
      assert.deepEqual(
        Buffer.from(encodeDiskInPlace(sid, encodeDiskMessage(m, HEADER_SIZE))),
        Buffer.from(encodeMessage({ type: 'disk', sid, body: encodeDiskMessage(m) })),
      )
    }
    assert.throws(() => encodeDiskInPlace('nope', Buffer.alloc(HEADER_SIZE + 3)), TypeError)
    assert.throws(() => encodeDiskInPlace('fedcba9876543210', Buffer.alloc(MAX_WIRE_MESSAGE + 1)), RangeError)
  })

  it('refuses bad input with MigrationDecodeError', () => {
    assert.throws(() => decodeDiskMessage(Buffer.from([2, 1])), decodeError)
    assert.throws(() => decodeDiskMessage(Buffer.from([1, 9])), decodeError)
    const info = Buffer.from(encodeDiskMessage({ kind: 'info', size: 1 << 20, chunkSize: 65536 }))
    info.writeUInt32BE(3000, 10)
    assert.throws(() => decodeDiskMessage(info), /chunk size/)
    const data = Buffer.from(
      encodeDiskMessage({ kind: 'data', round: 0, chunks: [{ index: 0, flags: 0, data: Buffer.alloc(10) }] }),
    )
    assert.throws(() => decodeDiskMessage(data.subarray(0, data.length - 1)), decodeError)
    data[14] = FLAG_ZERO
    assert.throws(() => decodeDiskMessage(data), /zero chunk with bytes/)
    data[14] = 0x80
    assert.throws(() => decodeDiskMessage(data), /flags/)
    assert.throws(() => decodeDiskMessage(Buffer.from([1, 5, 2])), /bad disk seed/)
    assert.throws(() => decodeDiskMessage(Buffer.from([1, 5, 1, 0])), /bad disk seed/)
  })

  it('fuzz: any bytes decode or throw MigrationDecodeError, never anything else', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.uint8Array({ maxLength: 400 }),
          fc.uint8Array({ maxLength: 400 }).map((u) => Uint8Array.from([1, 1 + ((u[0] ?? 0) % 5), ...u])),
        ),
        (bytes) => {
          try {
            decodeDiskMessage(bytes)
          } catch (err) {
            assert.equal((err as Error).name, 'MigrationDecodeError', String(err))
          }
        },
      ),
      { numRuns: 3000 },
    )
  })

  it('turns extents into chunk indices (a chunk touched anywhere counts once)', () => {
    const ext = [
      { offset: 0, length: 4096, flags: 1 },
      { offset: 4096, length: 65536 * 2, flags: 0 },
      { offset: 4096 + 131072, length: 65536, flags: 1 },
      { offset: 200704 + 65536, length: 10, flags: 1 },
    ]
    assert.deepEqual(
      extentsToChunks(ext, 65536, (f) => f === 1),
      [0, 2, 3, 4],
    )
    assert.deepEqual(
      extentsToChunks(ext, 65536, (f) => f === 0),
      [0, 1, 2],
    )
  })
})
