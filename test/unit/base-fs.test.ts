import assert from 'node:assert/strict'
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { readJsonObjectFile, writeFileDurable } from '../../src/base/fs.ts'
import { createFileLedger } from '../../vm/migration/ledger.ts'

describe('writeFileDurable (src/base/fs.ts)', () => {
  let dir: string
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'base-fs-'))
  })
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('creates and replaces a file atomically, private by default, leaving no temporary file', async () => {
    const f = join(dir, 'state.json')
    await writeFileDurable(f, '{"a":1}')
    assert.equal(await readFile(f, 'utf8'), '{"a":1}')
    assert.equal((await stat(f)).mode & 0o777, 0o600)
    await writeFileDurable(f, Buffer.from('{"a":2}'))
    assert.equal(await readFile(f, 'utf8'), '{"a":2}')
    assert.deepEqual(await readdir(dir), ['state.json'])
  })

  it('exclusive: creates once, then fails with EEXIST and keeps the first content (keys)', async () => {
    const f = join(dir, 'identity.key')
    const racers = await Promise.allSettled(
      Array.from({ length: 8 }, (_, i) => writeFileDurable(f, `key-${i}`, { exclusive: true })),
    )
    const won = racers.filter((r) => r.status === 'fulfilled')
    assert.equal(won.length, 1, 'exactly one creator wins')
    for (const r of racers)
      if (r.status === 'rejected') assert.equal((r.reason as NodeJS.ErrnoException).code, 'EEXIST')
    const first = await readFile(f, 'utf8')
    await assert.rejects(writeFileDurable(f, 'other', { exclusive: true }), { code: 'EEXIST' })
    assert.equal(await readFile(f, 'utf8'), first)
    assert.equal((await stat(f)).mode & 0o777, 0o600)
    assert.deepEqual(await readdir(dir), ['identity.key'], 'no temporary file left')
  })

  it('many writes in a row: the last one wins and nothing else is left', async () => {
    const f = join(dir, 'tokens.json')
    await Promise.all(Array.from({ length: 20 }, (_, i) => writeFileDurable(f, String(i))))
    assert.match(await readFile(f, 'utf8'), /^\d+$/)
    assert.deepEqual(await readdir(dir), ['tokens.json'])
  })

  it('a failed write leaves the old content and no temporary file', async () => {
    const f = join(dir, 'x.json')
    await writeFile(f, 'old')
    await assert.rejects(writeFileDurable(join(dir, 'missing', 'x.json'), 'new'), { code: 'ENOENT' })
    assert.equal(await readFile(f, 'utf8'), 'old')
    assert.deepEqual(await readdir(dir), ['x.json'])
  })

  it('readJsonObjectFile: {} for a file not written yet; a corrupt or wrong file is an error naming it', async () => {
    assert.deepEqual(await readJsonObjectFile(join(dir, 'none.json')), {})
    await writeFileDurable(join(dir, 'ok.json'), '{"g1":3}')
    assert.deepEqual(await readJsonObjectFile(join(dir, 'ok.json')), { g1: 3 })
    await writeFile(join(dir, 'torn.json'), '{"g1":')
    await assert.rejects(readJsonObjectFile(join(dir, 'torn.json')), {
      name: 'StateFileError',
      message: /torn\.json is not valid JSON/,
    })
    await writeFile(join(dir, 'list.json'), '[1]')
    await assert.rejects(readJsonObjectFile(join(dir, 'list.json')), { name: 'StateFileError' })
    await assert.rejects(readJsonObjectFile(dir), { name: 'StateFileError' }) // a directory: EISDIR
  })

  it('a corrupt fencing ledger stops the agent instead of forgetting its commits', async () => {
    const ledger = await createFileLedger(dir) // first start: nothing recorded
    assert.equal(ledger.token('g1'), 0)
    await writeFile(join(dir, 'migration-ledger.json'), 'garbage')
    await assert.rejects(createFileLedger(dir), { name: 'StateFileError', message: /migration-ledger\.json/ })
  })
})
