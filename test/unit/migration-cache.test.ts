import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { sha256 } from '../../net/chunks/hash.ts'
import type { ChunkStore } from '../../net/chunks/interfaces.ts'
import { createMemoryRamCache, createStoreRamCache } from '../../vm/migration/cache.ts'

describe('migration RAM cache over the chunk store', () => {
  it('serves a chunk whose bytes match its hash, refuses one that does not (ChunkVerifyError)', async () => {
    const good = Buffer.alloc(65536, 7)
    const bad = Buffer.from(good)
    bad[100] ^= 1
    const served = new Map([[sha256(good).toString('hex'), bad]])
    // A store that serves the wrong bytes without noticing (its own checks are its business).
    const store = {
      has: (h: Uint8Array) => served.has(Buffer.from(h).toString('hex')),
      get: async (h: Uint8Array) => served.get(Buffer.from(h).toString('hex'))!,
    } as unknown as ChunkStore
    const cache = createStoreRamCache(store)
    assert.equal(cache.has(sha256(good)), true)
    await assert.rejects(cache.get(sha256(good)), { name: 'ChunkVerifyError' })
    served.set(sha256(good).toString('hex'), good)
    assert.ok(Buffer.from(await cache.get(sha256(good))).equals(good))
  })

  it('a delayed remember is brought forward by settled(): a move back finds the chunks at once', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ram-cache-'))
    try {
      const page = Buffer.alloc(4096, 9)
      const ram = join(dir, 'ram')
      await writeFile(ram, Buffer.concat([page, Buffer.alloc(4096)]))
      const cache = createMemoryRamCache()
      const remembered = cache.remember('g1', ram, 4096, { delayMs: 3_600_000 })
      assert.equal(cache.has(sha256(page)), false, 'not yet: the remember waits its delay')
      await cache.settled('g1') // an hour's delay, ended now
      assert.equal(cache.has(sha256(page)), true)
      await remembered
      await cache.settled('g1') // nothing pending: returns at once
      assert.equal(cache.chunks(), 1)
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('an aborted delayed remember ends at once, rejected, and settled() does not wait for it', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ram-cache-'))
    try {
      const ram = join(dir, 'ram')
      await writeFile(ram, Buffer.alloc(4096, 1))
      const chunkStore = { dir } as unknown as ChunkStore
      const cache = createStoreRamCache(chunkStore)
      const ac = new AbortController()
      const p = cache.remember('g1', ram, 4096, { delayMs: 3_600_000, signal: ac.signal })
      ac.abort()
      await assert.rejects(p, { name: 'AbortError' })
      await cache.settled('g1')
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})
