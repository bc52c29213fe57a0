import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { mkdtemp, open, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { sha256, toHex } from '../../net/chunks/hash.ts'
import {
  buildManifest,
  chunkLength,
  decodeManifest,
  encodeManifest,
  hashAt,
  isZeroAt,
  manifestId,
  updateManifest,
} from '../../net/chunks/manifest.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { writeTestFile, writeVariant } from '../../net/chunks/testing.ts'

describe('chunk manifests', function () {
  this.timeout(60_000)
  let dir: string
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'chunk-manifest-'))
  })
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('lists every chunk’s SHA-256, marks zero chunks, handles a short last chunk', async () => {
    const file = join(dir, 'f')
    const size = 5 * 1024 * 1024 + 12345
    await writeTestFile(file, size, { zeroFraction: 0.3 })
    const { manifest: m, id, zeroChunks } = await buildManifest(file, { readSize: 1024 * 1024 })
    const bytes = await readFile(file)
    assert.equal(m.count, Math.ceil(size / 65536))
    assert.equal(chunkLength(m, m.count - 1), 12345)
    let zeros = 0
    for (let i = 0; i < m.count; i++) {
      const part = bytes.subarray(i * 65536, i * 65536 + chunkLength(m, i))
      if (part.every((b) => b === 0)) {
        zeros++
        assert.ok(isZeroAt(m, i))
      } else assert.equal(toHex(hashAt(m, i)), createHash('sha256').update(part).digest('hex'))
    }
    assert.equal(zeroChunks, zeros)
    assert.ok(zeros > 0)
    assert.equal(id, manifestId(m))
    assert.equal(id, toHex(sha256(encodeManifest(m))))
    const back = decodeManifest(encodeManifest(m))
    assert.deepEqual(back, m)
  })

  it('a byte range builds the manifest of that range only', async () => {
    const file = join(dir, 'f')
    await writeTestFile(file, 1024 * 1024)
    const bytes = await readFile(file)
    const { manifest: m } = await buildManifest(file, { offset: 65536 * 3, length: 65536 * 2 })
    assert.equal(m.count, 2)
    assert.equal(toHex(hashAt(m, 0)), toHex(sha256(bytes.subarray(65536 * 3, 65536 * 4))))
  })

  it('updateManifest re-hashes only the dirty chunks and imports them into the store', async () => {
    const a = join(dir, 'a')
    const b = join(dir, 'b')
    await writeTestFile(a, 4 * 1024 * 1024)
    const store = await openChunkStore({ dir: join(dir, 'store') })
    const base = await buildManifest(a, { store })
    const changed = await writeVariant(a, b, 0.1)
    // A dirty index whose bytes did not change must not be reported as changed.
    assert.ok(!changed.includes(1) && !changed.includes(63))
    const upd = await updateManifest(base.manifest, b, [...changed, 1, 63, 63], { store })
    const full = await buildManifest(b)
    assert.equal(upd.id, full.id)
    assert.deepEqual(upd.changed, changed)
    for (const i of changed) assert.ok(store.has(hashAt(upd.manifest, i)))
    // Zeroing a chunk turns it into the zero marker.
    const fh = await open(b, 'r+')
    await fh.write(Buffer.alloc(65536), 0, 65536, 65536 * 5)
    await fh.close()
    const upd2 = await updateManifest(upd.manifest, b, [5])
    assert.ok(isZeroAt(upd2.manifest, 5))
  })

  it('decode rejects malformed encodings with ManifestDecodeError (fuzz)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        try {
          const m = decodeManifest(bytes)
          // Anything accepted must re-encode to the same bytes.
          assert.deepEqual(Buffer.from(encodeManifest(m)), Buffer.from(bytes))
        } catch (err) {
          assert.equal((err as Error).name, 'ManifestDecodeError')
        }
      }),
      { numRuns: 2000 },
    )
    // A header claiming a huge size is refused before anything is allocated.
    const hdr = Buffer.alloc(18)
    hdr[0] = 1
    hdr.writeUInt32BE(65536, 2)
    hdr.writeBigUInt64BE(2n ** 60n, 6)
    assert.throws(() => decodeManifest(hdr), { name: 'ManifestDecodeError' })
  })
})
