import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { deflateRawSync } from 'node:zlib'
import { INCOMPRESSIBLE_BITS, looksCompressible, sampleEntropy } from '../../vm/disk/compressible.ts'

/** A PostgreSQL-like page run: short rows of digits and a blank-padded filler. */
function rows(size: number): Buffer {
  const b = Buffer.alloc(size, 0x20)
  for (let i = 0, n = 0; i + 100 <= size; i += 100, n++) b.write(`${n}|${n % 7}|${(n * 13) % 1000}|`, i)
  return b
}

describe('disk chunk compressibility guess', () => {
  it('skips random data and tries what deflate shrinks by more than 10%', () => {
    const cases: Array<[string, Buffer]> = [
      ['random', randomBytes(65536)],
      ['rows', rows(65536)],
      ['half zero', Buffer.concat([randomBytes(32768), Buffer.alloc(32768)])],
      ['zero', Buffer.alloc(65536)],
      ['short tail', randomBytes(1000)],
    ]
    for (const [name, data] of cases) {
      const saves = deflateRawSync(data, { level: 1 }).byteLength < 0.9 * data.byteLength
      // The guess may only err towards trying (a missed saving costs bytes, a wasted try costs CPU):
      // everything deflate shrinks is tried; random data is not.
      if (saves) assert.equal(looksCompressible(data), true, `${name} shrinks but was not tried`)
      if (name === 'random') assert.equal(looksCompressible(data), false, 'random data was tried')
    }
  })

  it('measures bits per byte from spread slices', () => {
    assert.equal(sampleEntropy(new Uint8Array(0)), 0)
    assert.equal(sampleEntropy(Buffer.alloc(65536, 7)), 0)
    const all = Buffer.alloc(4096)
    for (let i = 0; i < all.length; i++) all[i] = i & 0xff
    assert.equal(sampleEntropy(all), 8)
    assert.ok(sampleEntropy(randomBytes(65536)) >= INCOMPRESSIBLE_BITS)
  })
})
