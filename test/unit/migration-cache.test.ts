import assert from 'node:assert/strict'
import { sha256 } from '../../net/chunks/hash.ts'
import type { ChunkStore } from '../../net/chunks/interfaces.ts'
import { createStoreRamCache } from '../../vm/migration/cache.ts'

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
})
