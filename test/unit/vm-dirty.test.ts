import assert from 'node:assert/strict'
import { mkdtemp, open, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { CompareDirtyTracker } from '../../vm/dirty/compare.ts'
import { createDirtyTracker, softDirtySupported } from '../../vm/dirty/index.ts'

const MiB = 1024 * 1024

describe('dirty tracking: compare fallback on a plain file', function () {
  this.timeout(60_000)
  let dir: string
  let file: string
  const size = 8 * MiB

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vm-dirty-'))
    file = join(dir, 'ram')
    const fh = await open(file, 'w')
    await fh.truncate(size)
    await fh.close()
  })
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  async function write(offset: number, data: Buffer): Promise<void> {
    const fh = await open(file, 'r+')
    await fh.write(data, 0, data.length, offset)
    await fh.close()
  }

  it('reports exactly the chunks written since the last collect, and a rate', async () => {
    const t = new CompareDirtyTracker(file, size)
    assert.equal(t.method, 'compare')
    await t.start()
    assert.deepEqual((await t.collect()).chunks, [])
    await write(0, Buffer.from([1]))
    await write(65536 * 5 + 100, Buffer.alloc(65536, 2)) // spans chunks 5 and 6
    await write(size - 1, Buffer.from([3]))
    const r = await t.collect()
    assert.deepEqual(r.chunks, [0, 5, 6, 127])
    assert.equal(r.dirtyBytes, 4 * 65536)
    assert.ok(r.rateBytesPerSec > 0 && Number.isFinite(r.rateBytesPerSec))
    assert.ok(r.intervalMs > 0 && r.scanMs >= 0)
    assert.deepEqual((await t.collect()).chunks, [], 'a round resets the baseline')
    await write(0, Buffer.from([1])) // same byte again: no change
    assert.deepEqual((await t.collect()).chunks, [])
    await t.close()
  })

  it('honours the chunk size and does not miss writes across 4 MiB read blocks', async () => {
    const t = new CompareDirtyTracker(file, size, 4096)
    await t.start()
    await write(4 * MiB - 1, Buffer.from([9, 9])) // last byte of block 0, first byte of block 1
    const r = await t.collect()
    assert.deepEqual(r.chunks, [1023, 1024])
    assert.equal(r.dirtyBytes, 2 * 4096)
    assert.throws(() => new CompareDirtyTracker(file, size, 1000), RangeError)
  })

  it('property: random writes are always reported, nothing else is', async () => {
    const t = new CompareDirtyTracker(file, size)
    await t.start()
    for (let round = 0; round < 5; round++) {
      const want = new Set<number>()
      for (let i = 0; i < 20; i++) {
        const off = Math.floor(Math.random() * (size - 16))
        const data = Buffer.alloc(16)
        for (let j = 0; j < 16; j++) data[j] = Math.floor(Math.random() * 255) + 1
        await write(off, data)
        for (let o = off; o < off + 16; o++) want.add(Math.floor(o / 65536))
      }
      const got = (await t.collect()).chunks
      // A random write may happen to restore an earlier value; never report a chunk nobody touched.
      for (const c of got) assert.ok(want.has(c), `chunk ${c} reported but never written`)
      assert.ok(got.length >= want.size - 1, `${got.length} of ${want.size} chunks reported`)
    }
  })

  it('measures a round over a 256 MiB file (the known figure is ~100 ms)', async () => {
    const big = join(dir, 'big')
    const fh = await open(big, 'w')
    await fh.truncate(256 * MiB)
    await fh.write(Buffer.alloc(64 * MiB, 7), 0, 64 * MiB, 0)
    await fh.close()
    const t = createDirtyTracker({ path: big, size: 256 * MiB })
    await t.start()
    const times: number[] = []
    for (let i = 0; i < 3; i++) {
      // Each round dirties 3 chunks spread over the file (first, middle, last): a round that skipped
      // part of the file would miss one.
      const offsets = [i * 4096, 128 * MiB + i * 4096, 256 * MiB - 65536 + i * 4096]
      const fw = await open(big, 'r+')
      for (const off of offsets) await fw.write(Buffer.alloc(16, 0x40 + i), 0, 16, off)
      await fw.close()
      const round = await t.collect()
      assert.deepEqual(
        [...round.chunks].sort((p, q) => p - q),
        offsets.map((o) => Math.floor(o / 65536)),
        `round ${i}`,
      )
      times.push(Math.round(round.scanMs))
    }
    process.stdout.write(`      [measure] dirty round, 256 MiB file: ${times.join(', ')} ms\n`)
    await t.close()
    await rm(big)
  })

  it('detects that this kernel lacks soft-dirty bits (or has them) without throwing', () => {
    assert.equal(typeof softDirtySupported(), 'boolean')
  })
})

describe('dirty tracking: soft-dirty reader (fake /proc)', () => {
  it('maps soft-dirty pages of every mapping of the RAM file to chunks, under freeze, and clears', async () => {
    const { mkdir, readFile: read, writeFile: wr } = await import('node:fs/promises')
    const { SoftDirtyTracker } = await import('../../vm/dirty/softdirty.ts')
    const proc = await mkdtemp(join(tmpdir(), 'vm-proc-'))
    try {
      const pid = 4242
      await mkdir(join(proc, String(pid)))
      const ram = '/dev/shm/mesh/vm.ram'
      await wr(
        join(proc, String(pid), 'maps'),
        [
          '00400000-00401000 r-xp 00000000 08:01 1 /usr/bin/qemu-system-x86_64',
          `10000000-10100000 rw-s 00000000 00:1a 77 ${ram}`, // 256 pages at file offset 0
          `20000000-20040000 rw-s 00080000 00:1a 77 ${ram}`, // 64 pages at file offset 512 KiB
          '30000000-30001000 rw-p 00000000 00:00 0 ',
          '',
        ].join('\n'),
      )
      const pagemap = Buffer.alloc(0x20040 * 8)
      const set = (addr: number) => pagemap.writeBigUInt64LE(1n << 55n, (addr / 4096) * 8)
      set(0x10000000) // page 0 → chunk 0
      set(0x10000000 + 17 * 4096) // page 17 → chunk 1
      set(0x10000000 + 255 * 4096) // page 255 → chunk 15
      set(0x20000000 + 3 * 4096) // file offset 512 KiB + 12 KiB → chunk 8
      await wr(join(proc, String(pid), 'pagemap'), pagemap)
      await wr(join(proc, String(pid), 'clear_refs'), '')
      let frozen = 0
      const freeze = async <T>(fn: () => Promise<T>): Promise<T> => {
        frozen++
        return fn()
      }
      const t = new SoftDirtyTracker(pid, ram, 1024 * 1024, freeze, 64 * 1024, proc)
      assert.equal(t.method, 'soft-dirty')
      await t.start()
      assert.equal(await read(join(proc, String(pid), 'clear_refs'), 'utf8'), '4')
      await wr(join(proc, String(pid), 'clear_refs'), '')
      const r = await t.collect()
      assert.deepEqual(r.chunks, [0, 1, 8, 15])
      assert.equal(r.dirtyBytes, 4 * 65536)
      assert.equal(frozen, 2, 'bits are read and cleared with the guest held still')
      assert.equal(await read(join(proc, String(pid), 'clear_refs'), 'utf8'), '4')
    } finally {
      await rm(proc, { recursive: true, force: true })
    }
  })
})
