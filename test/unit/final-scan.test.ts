import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { HeldChunks, ScanWorker, scanRange } from '../../vm/migration/final-scan.ts'

describe('final scan (held chunks, scan worker)', () => {
  let dir: string
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'final-scan-'))
  })
  after(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('this thread and the worker find the same chunks: changed, zeroed, newly written; not the held ones', async () => {
    const cs = 65536
    const count = 96
    const ram = Buffer.alloc(count * cs)
    const held = new HeldChunks(ram.byteLength, cs)
    for (let i = 0; i < count; i += 3) {
      const c = randomBytes(cs)
      c.copy(ram, i * cs)
      held.set(i, c)
    }
    ram[9 * cs + 5] ^= 1 // a held chunk changed (held: every third)
    ram.fill(0, 30 * cs, 31 * cs) // a held chunk zeroed
    ram[50 * cs + 7] = 1 // a chunk never sent (zeros there) written
    ram[95 * cs + cs - 1] = 9 // the last byte of the last chunk (never sent)
    await writeFile(join(dir, 'ram'), ram)
    const want = [9, 30, 50, 95]
    const w = new ScanWorker(held)
    try {
      assert.deepEqual(
        await scanRange(join(dir, 'ram'), held, 0, count),
        want.concat().sort((a, b) => a - b),
      )
      const lower = await scanRange(join(dir, 'ram'), held, 0, 40)
      const upper = await w.scan(join(dir, 'ram'), 40, count)
      assert.deepEqual(lower.concat(upper), want)
    } finally {
      await w.close()
    }
    // A worker that is gone rejects (the encoder then scans that half itself).
    await assert.rejects(w.scan(join(dir, 'ram'), 0, count))
  })

  it('a worker asked to read a missing file answers with an error, not a crash', async () => {
    const held = new HeldChunks(4 * 65536, 65536)
    const w = new ScanWorker(held)
    try {
      await assert.rejects(w.scan(join(dir, 'absent'), 0, 4), /scan worker: .*ENOENT/)
      // and keeps working
      await writeFile(join(dir, 'zeros'), Buffer.alloc(4 * 65536))
      assert.deepEqual(await w.scan(join(dir, 'zeros'), 0, 4), [])
    } finally {
      await w.close()
    }
  })
})
