import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type ChunkService, createChunkService } from '../../net/chunks/exchange.ts'
import { HASH_SIZE, sha256, toHex } from '../../net/chunks/hash.ts'
import type { ChunkStore } from '../../net/chunks/interfaces.ts'
import { buildManifest, hashAt, makeManifest } from '../../net/chunks/manifest.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import {
  createRamIndex,
  pullStandby,
  type RamIndex,
  ramServingStore,
  runStandbySender,
  STANDBY_DISK_PIN,
  STANDBY_PIN,
  type StandbyStatus,
  standbyBytesToSend,
} from '../../src/agent/spot/standby.ts'
import { createDiskArbiter } from '../../vm/disk/standby.ts'

const MiB = 2 ** 20
const CHUNK = 64 * 1024

interface Side {
  store: ChunkStore
  raw: ChunkStore
  svc: ChunkService
  index: RamIndex
}

describe('warm standby: RAM chunks served from the RAM file, pulled by the standby at a bounded rate', function () {
  this.timeout(60_000)
  let dir = ''
  const sides: Side[] = []
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'mesh-standby-'))
  })
  afterEach(async () => {
    for (const s of sides.splice(0)) {
      s.svc.stop()
      await s.index.close()
      await s.store.close()
    }
    await rm(dir, { recursive: true, force: true })
  })

  async function side(net: ReturnType<typeof createMemoryNetwork>, id: string): Promise<Side> {
    const raw = await openChunkStore({ dir: join(dir, id) })
    const index = createRamIndex()
    const store = ramServingStore(raw, index)
    const svc = createChunkService({ overlay: net.node(id), store })
    svc.start()
    const s = { store, raw, svc, index }
    sides.push(s)
    return s
  }

  /** A "RAM file": random chunks with every fourth chunk zero. */
  async function ramFile(chunks: number): Promise<string> {
    const buf = randomBytes(chunks * CHUNK)
    for (let i = 0; i < chunks; i += 4) buf.fill(0, i * CHUNK, (i + 1) * CHUNK)
    const path = join(dir, 'ram')
    await writeFile(path, buf)
    return path
  }
  async function rewrite(path: string, chunkIndex: number): Promise<void> {
    const fh = await open(path, 'r+')
    await fh.write(randomBytes(CHUNK), 0, CHUNK, chunkIndex * CHUNK)
    await fh.close()
  }

  it('the standby pulls every non-zero chunk, then only what changed, within the rate', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = await side(net, 'a')
    const b = await side(net, 'b')
    const path = await ramFile(64) // 4 MiB, 3 MiB non-zero
    const { manifest } = await buildManifest(path, { chunkSize: CHUNK })
    const id = await a.index.set('vm1', path, manifest)
    assert.ok(!a.raw.has(hashAt(manifest, 1)), "the host's own store holds none of it")
    const ac = new AbortController()
    const rate = 2 * MiB
    const t0 = performance.now()
    const r1 = await pullStandby(
      { service: b.svc, store: b.store },
      'a',
      { vm: 'vm1', manifest: id, rateBps: rate },
      ac.signal,
    )
    const ms = performance.now() - t0
    assert.equal(r1.fetchedBytes, 48 * CHUNK)
    assert.equal(r1.missingChunks, 0)
    assert.ok(ms >= (r1.fetchedBytes / rate) * 1000 * 0.9, `3 MiB at 2 MiB/s took ${ms.toFixed(0)} ms`)
    for (let i = 1; i < 64; i++) if (i % 4 !== 0) assert.ok(b.raw.has(hashAt(manifest, i)))
    assert.equal(b.raw.pins().get(STANDBY_PIN('vm1')), id)

    // Three chunks change: the next pass moves those three only.
    for (const i of [1, 2, 3]) await rewrite(path, i)
    const m2 = (await buildManifest(path, { chunkSize: CHUNK })).manifest
    const id2 = await a.index.set('vm1', path, m2)
    const r2 = await pullStandby(
      { service: b.svc, store: b.store },
      'a',
      { vm: 'vm1', manifest: id2, rateBps: 64 * MiB },
      ac.signal,
    )
    assert.equal(r2.fetchedBytes, 3 * CHUNK)
    assert.equal(r2.presentBytes, 45 * CHUNK)
  })

  it('a chunk the guest rewrote after the hash is served as missing (never stale bytes) and comes next pass', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = await side(net, 'a')
    const b = await side(net, 'b')
    const path = await ramFile(16)
    const { manifest } = await buildManifest(path, { chunkSize: CHUNK })
    const id = await a.index.set('vm1', path, manifest)
    const old = hashAt(manifest, 5)
    await rewrite(path, 5)
    const r = await pullStandby(
      { service: b.svc, store: b.store },
      'a',
      { vm: 'vm1', manifest: id, rateBps: 64 * MiB },
      new AbortController().signal,
    )
    assert.equal(r.missingChunks, 1)
    assert.ok(!b.raw.has(old), 'the stale chunk was never stored under the old name')
    const m2 = (await buildManifest(path, { chunkSize: CHUNK })).manifest
    const id2 = await a.index.set('vm1', path, m2)
    const r2 = await pullStandby(
      { service: b.svc, store: b.store },
      'a',
      { vm: 'vm1', manifest: id2, rateBps: 64 * MiB },
      new AbortController().signal,
    )
    assert.equal(r2.missingChunks, 0)
    assert.ok(b.raw.has(hashAt(m2, 5)))
    // The host serves a RAM chunk only while it is indexed, and verified.
    await a.index.drop('vm1')
    assert.equal(a.store.has(hashAt(m2, 6)), false)
    await assert.rejects(a.store.get(hashAt(m2, 6)), { name: 'ChunkNotFoundError' })
  })

  it('a pass keeps three slices in flight (each fetch spends its own round trips), misses only the rewritten chunk, and still keeps the rate', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = await side(net, 'a')
    const b = await side(net, 'b')
    const path = await ramFile(64) // 8 slices of 8 chunks, 6 non-zero each
    const { manifest } = await buildManifest(path, { chunkSize: CHUNK })
    const id = await a.index.set('vm1', path, manifest)
    // The guest rewrites a chunk of the third slice after the hash: that slice fails while others run.
    await rewrite(path, 21)
    // Counts the fetches running at once (the standby's service, as the pass sees it).
    let running = 0
    let most = 0
    const counting = (svc: ChunkService): ChunkService => ({
      ...svc,
      fetchManifest: (mid, o) => svc.fetchManifest(mid, o),
      fetch: async (m, o) => {
        running++
        most = Math.max(most, running)
        try {
          return await svc.fetch(m, o)
        } finally {
          running--
        }
      },
    })
    const r = await pullStandby(
      { service: counting(b.svc), store: b.store, sliceChunks: 8 },
      'a',
      { vm: 'vm1', manifest: id, rateBps: 2 ** 40 },
      new AbortController().signal,
    )
    assert.equal(most, 3, 'three slices in flight at once, never more')
    assert.equal(running, 0, 'every slice settled before the pass ended')
    assert.equal(r.missingChunks, 1)
    assert.equal(r.fetchedBytes, 47 * CHUNK)
    for (let i = 1; i < 64; i++)
      if (i % 4 !== 0 && i !== 21) assert.ok(b.raw.has(hashAt(manifest, i)), `chunk ${i} stored`)
    assert.equal(b.raw.pins().get(STANDBY_PIN('vm1')), id)

    // Eight slices at 2 MiB/s: in flight together, they still take no less than their bytes at the rate.
    const path2 = join(dir, 'ram2')
    const buf = randomBytes(64 * CHUNK)
    for (let i = 0; i < 64; i += 4) buf.fill(0, i * CHUNK, (i + 1) * CHUNK)
    await writeFile(path2, buf)
    const m2 = (await buildManifest(path2, { chunkSize: CHUNK })).manifest
    const id2 = await a.index.set('vm2', path2, m2)
    const rate = 2 * MiB
    const t0 = performance.now()
    const r2 = await pullStandby(
      { service: counting(b.svc), store: b.store, sliceChunks: 8 },
      'a',
      { vm: 'vm2', manifest: id2, rateBps: rate },
      new AbortController().signal,
    )
    const ms = performance.now() - t0
    assert.equal(r2.fetchedBytes, 48 * CHUNK)
    assert.ok(ms >= (r2.fetchedBytes / rate) * 1000 * 0.9, `3 MiB at 2 MiB/s took ${ms.toFixed(0)} ms`)

    // Aborted mid-pass: it fails as aborted, with no fetch left running.
    const path3 = join(dir, 'ram3')
    await writeFile(path3, randomBytes(64 * CHUNK))
    const m3 = (await buildManifest(path3, { chunkSize: CHUNK })).manifest
    const id3 = await a.index.set('vm3', path3, m3)
    const ac = new AbortController()
    const slow = counting(b.svc)
    const aborting: ChunkService = {
      ...slow,
      fetchManifest: (mid, o) => slow.fetchManifest(mid, o),
      fetch: (m, o) => {
        const f = slow.fetch(m, o)
        if (running === 3) ac.abort(new Error('evacuating'))
        return f
      },
    }
    await assert.rejects(
      pullStandby(
        { service: aborting, store: b.store, sliceChunks: 8 },
        'a',
        { vm: 'vm3', manifest: id3, rateBps: 2 ** 40 },
        ac.signal,
      ),
      { name: 'AbortError' },
    )
    assert.equal(running, 0, 'no slice is left fetching after the pass failed')
  })

  it('what a move to the standby must carry: the last pass missed + what the guest wrote since, at most all', () => {
    const MB = 1_000_000
    const st = { vm: 'g', state: 'synced' as const, passes: 3, lagBytes: 2 * MB, syncedAt: 10_000 }
    // Right after the pass: only what it missed.
    assert.equal(standbyBytesToSend({ ...st, dirtyRateBps: 32 * MB }, 10_000, 1024 * MB), 2 * MB)
    // 7 s later at 32 MB/s (RAM) + 1 MB/s (disk): 2 + 231 MB.
    assert.equal(
      standbyBytesToSend(
        { ...st, dirtyRateBps: 32 * MB, disk: { heldBytes: 0, lagBytes: 0, dirtyRateBps: MB } },
        17_000,
        1024 * MB,
      ),
      233 * MB,
    )
    // Never more than the VM holds; no pass yet: all of it.
    assert.equal(standbyBytesToSend({ ...st, dirtyRateBps: 32 * MB }, 100_000, 512 * MB), 512 * MB)
    assert.equal(standbyBytesToSend({ vm: 'g', state: 'syncing', passes: 0 }, 17_000, 512 * MB), 512 * MB)
  })

  it("the sender loop syncs pass after pass and reports the standby's lag", async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = await side(net, 'a')
    const b = await side(net, 'b')
    const path = await ramFile(32)
    const status: StandbyStatus = { vm: 'vm1', state: 'choosing', passes: 0 }
    const ac = new AbortController()
    let here = true
    const done = runStandbySender(
      'vm1',
      {
        index: a.index,
        choose: async () => ({ peer: 'b', name: 'b' }),
        ramPath: async () => (here ? path : undefined),
        rateBps: () => 64 * MiB,
        minIntervalMs: 50,
        warn: () => {},
        sync: (_peer, params, signal) => pullStandby({ service: b.svc, store: b.store }, 'a', params, signal),
      },
      status,
      ac.signal,
    )
    const until = async (f: () => boolean) => {
      const t0 = Date.now()
      while (!f()) {
        if (Date.now() - t0 > 10_000) throw new Error(`timeout; status ${JSON.stringify(status)}`)
        await new Promise((r) => setTimeout(r, 10))
      }
    }
    await until(() => status.passes >= 2)
    assert.equal(status.state, 'synced')
    assert.equal(status.peerName, 'b')
    assert.equal(status.lagBytes, 0)
    assert.equal(status.lastPass?.fetchedBytes, 0, 'nothing changed since the first pass')
    await rewrite(path, 9)
    const p = status.passes
    await until(() => status.passes >= p + 2)
    const m = (await buildManifest(path, { chunkSize: CHUNK })).manifest
    assert.ok(b.raw.has(hashAt(m, 9)))
    here = false
    await done
    assert.equal(a.store.has(hashAt(m, 9)), false, 'the RAM index is dropped when the VM is gone')
    assert.ok(toHex(hashAt(m, 9)).length === 64)
  })

  it("a pass's disk chunks are served through its reader, pinned apart, found by hash; a rewritten one is missing", async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = await side(net, 'a')
    const b = await side(net, 'b')
    const ramPath = await ramFile(8)
    const ram = await a.index.set(
      'vm1',
      ramPath,
      (await buildManifest(ramPath, { chunkSize: CHUNK })).manifest,
    )
    // A 2 MiB "disk": chunks 0-9 written by the guest, the rest zero (not in the overlay).
    const disk = Buffer.alloc(32 * CHUNK)
    randomBytes(10 * CHUNK).copy(disk)
    const hashes = Buffer.alloc(32 * HASH_SIZE)
    for (let i = 0; i < 10; i++) sha256(disk.subarray(i * CHUNK, (i + 1) * CHUNK)).copy(hashes, i * HASH_SIZE)
    const dm = makeManifest(disk.length, CHUNK, hashes)
    let reads = 0
    const diskId = a.index.setDisk('vm1', dm, async (index, target) => {
      reads++
      return disk.copy(target, 0, index * CHUNK, index * CHUNK + target.byteLength)
    })
    // The guest rewrites chunk 3 after the pass hashed it: served as missing, never stale.
    const stale = Buffer.from(hashAt(dm, 3))
    randomBytes(CHUNK).copy(disk, 3 * CHUNK)
    const r = await pullStandby(
      { service: b.svc, store: b.store },
      'a',
      { vm: 'vm1', manifest: ram, disk: diskId, rateBps: 64 * MiB },
      new AbortController().signal,
    )
    assert.deepEqual(r.disk, { fetchedBytes: 9 * CHUNK, presentBytes: 0, missingChunks: 1 })
    assert.equal(r.missingChunks, 1)
    assert.equal(r.fetchedBytes, 6 * CHUNK + 9 * CHUNK)
    assert.ok(reads >= 10)
    // What a move's DiskReceiver asks its store: the sha256 of each chunk.
    for (const i of [0, 1, 2, 4, 9]) assert.ok(b.raw.has(sha256(disk.subarray(i * CHUNK, (i + 1) * CHUNK))))
    assert.ok(!b.raw.has(stale))
    assert.equal(b.raw.pins().get(STANDBY_DISK_PIN('vm1')), diskId)
    assert.equal(b.raw.pins().get(STANDBY_PIN('vm1')), ram)
    // Once the pass ends, the host no longer serves its disk chunks (its NBD server is gone).
    a.index.dropDisk('vm1')
    assert.equal(a.store.has(hashAt(dm, 0)), false)
  })

  it('the disk arbiter: a move takes the disk from a standby pass at once; the next pass waits for the move', async () => {
    const arb = createDiskArbiter()
    const order: string[] = []
    let releaseStandby: (() => void) | undefined
    releaseStandby = await arb.shared(() => {
      order.push('preempted')
      // The pass lets go a moment later (its NBD server stops first).
      setImmediate(() => {
        order.push('standby released')
        releaseStandby?.()
      })
    })
    const releaseMove = await arb.exclusive()
    order.push('move has it')
    assert.deepEqual(order, ['preempted', 'standby released', 'move has it'])
    let second = false
    const next = arb
      .shared(() => {})
      .then((rel) => {
        second = true
        return rel
      })
    await new Promise((r) => setImmediate(r))
    assert.equal(second, false, 'a standby pass never starts while a move holds the disk')
    releaseMove()
    ;(await next)()
    assert.equal(second, true)
    // A pass waiting for a move can be aborted.
    const rel = await arb.exclusive()
    const ac = new AbortController()
    const waiting = arb.shared(() => {}, ac.signal)
    ac.abort()
    await assert.rejects(waiting, { name: 'AbortError' })
    rel()
  })
})
