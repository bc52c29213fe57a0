import assert from 'node:assert/strict'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type ChunkService, createChunkService } from '../../net/chunks/exchange.ts'
import {
  decodeImageRecord,
  encodeImageRecord,
  type ImageProgress,
  type ImageRegistry,
  imageControlHandlers,
  openImageRegistry,
} from '../../net/chunks/images.ts'
import type { ChunkStore } from '../../net/chunks/interfaces.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { writeTestFile, writeVariant } from '../../net/chunks/testing.ts'
import { createMemoryNetwork, type MemoryNetwork } from '../../net/link/memory.ts'
import { buildImageCommand, type ImageClient } from '../../src/commands/image.ts'
import { createProgressRenderer, type ProgressEvent, RateMeter, renderLine } from '../../src/progress.ts'

const MiB = 1024 * 1024

describe('chunk images', function () {
  this.timeout(60_000)
  let dir: string
  let net: MemoryNetwork
  const nodes: { store: ChunkStore; svc: ChunkService; reg: ImageRegistry }[] = []

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'chunk-images-'))
    net = createMemoryNetwork()
  })
  afterEach(async () => {
    for (const n of nodes.splice(0)) {
      n.svc.stop()
      await n.store.close()
    }
    await rm(dir, { recursive: true, force: true })
  })

  async function node(id: string) {
    const store = await openChunkStore({ dir: join(dir, id) })
    const reg = await openImageRegistry({ store })
    const svc = createChunkService({ overlay: net.node(id), store, images: reg })
    svc.start()
    const n = { store, svc, reg }
    nodes.push(n)
    return n
  }

  it('push on one member, pull on another into a dir, then re-serve from the puller', async () => {
    const kernel = join(dir, 'vmlinuz')
    const disk = join(dir, 'disk.img')
    await writeTestFile(kernel, 3 * MiB + 5)
    await writeTestFile(disk, 8 * MiB, { zeroFraction: 0.5 })
    const a = await node('a')
    const b = await node('b')
    const c = await node('c')
    net.connect('a', 'b')
    const events: ImageProgress[] = []
    const rec = await a.reg.push([kernel, disk], 'debian:12', { onProgress: (e) => events.push(e) })
    assert.deepEqual(
      rec.files.map((f) => f.name),
      ['vmlinuz', 'disk.img'],
    )
    assert.ok(events.some((e) => e.phase === 'hash'))
    const out = join(dir, 'out')
    const pulled = await b.reg.pull(b.svc, 'debian:12', out)
    assert.deepEqual(pulled.from, ['a'])
    assert.ok((await readFile(join(out, 'vmlinuz'))).equals(await readFile(kernel)))
    assert.ok((await readFile(join(out, 'disk.img'))).equals(await readFile(disk)))
    assert.deepEqual(
      b.reg.list().map((r) => `${r.name}:${r.tag}`),
      ['debian:12'],
    )
    // b now holds and serves the image: c pulls it with a gone.
    net.disconnect('a', 'b')
    net.connect('b', 'c')
    const again = await c.reg.pull(c.svc, 'debian:12', undefined)
    assert.deepEqual(again.from, ['b'])
    assert.ok(c.store.stats().bytes > 0)
    await assert.rejects(c.reg.pull(c.svc, 'nosuch:1', undefined), { name: 'ImageNotFoundError' })
    // The VM layer's `image:debian:12` resolves to an assembled local file, from the store alone.
    net.disconnect('b', 'c')
    const k = await c.reg.materialize('debian:12', {
      service: c.svc,
      dir: join(dir, 'files'),
      file: 'vmlinuz',
    })
    assert.ok((await readFile(k)).equals(await readFile(kernel)))
    assert.equal(
      await c.reg.materialize('debian:12', { service: c.svc, dir: join(dir, 'files'), file: 'vmlinuz' }),
      k,
    )
    await assert.rejects(c.reg.materialize('debian:12', { service: c.svc, dir: join(dir, 'files') }), {
      name: 'ImageError',
    })
  })

  it('pulling v2 of an image moves only the changed chunks', async () => {
    const v1 = join(dir, 'disk1')
    const v2dir = join(dir, 'v2')
    const { mkdir } = await import('node:fs/promises')
    await mkdir(v2dir)
    const v2 = join(v2dir, 'disk1')
    await writeTestFile(v1, 16 * MiB)
    await writeVariant(v1, v2, 0.1)
    const a = await node('a')
    const b = await node('b')
    net.connect('a', 'b')
    await a.reg.push([v1], 'img:v1')
    await a.reg.push([v2], 'img:v2')
    await b.reg.pull(b.svc, 'img:v1', undefined)
    const r = await b.reg.pull(b.svc, 'img:v2', join(dir, 'o'))
    assert.ok(
      r.bytesFetched < 0.12 * 16 * MiB && r.bytesFetched > 0.08 * 16 * MiB,
      `fetched ${r.bytesFetched}`,
    )
    assert.ok((await readFile(join(dir, 'o', 'disk1'))).equals(await readFile(v2)))
  })

  it('control handlers validate params and stream events', async () => {
    const f = join(dir, 'k')
    await writeTestFile(f, MiB)
    const a = await node('a')
    const h = imageControlHandlers({ registry: a.reg, service: a.svc })
    const ev: unknown[] = []
    const ctx = { emit: (e: unknown) => ev.push(e), signal: new AbortController().signal }
    await assert.rejects(h['image.push']!({ files: ['relative'], ref: 'x:1' }, ctx), { name: 'ImageError' })
    await h['image.push']!({ files: [f], ref: 'x:1' }, ctx)
    assert.ok(ev.length > 0)
    const ls = (await h['image.ls']!({}, ctx)) as { images: { name: string }[] }
    assert.equal(ls.images[0]!.name, 'x')
  })

  it('as an agent service: lazy handlers, push on one agent, pull on another', async () => {
    const f = join(dir, 'initrd')
    await writeTestFile(f, 2 * MiB)
    const { createChunkAgentService } = await import('../../src/agent/services/chunks.ts')
    const a = createChunkAgentService({ stateDir: join(dir, 'sa'), overlay: () => net.node('a') })
    const b = createChunkAgentService({ stateDir: join(dir, 'sb'), overlay: () => net.node('b') })
    const ha = a.handlers()
    const ctx = { emit: () => {}, signal: new AbortController().signal }
    await assert.rejects(ha['image.ls']!({}, ctx), { name: 'ChunkError' })
    await a.start(ctx.signal)
    await b.start(ctx.signal)
    try {
      net.connect('a', 'b')
      await ha['image.push']!({ files: [f], ref: 'boot:1' }, ctx)
      const events: unknown[] = []
      const out = join(dir, 'pulled')
      await b.handlers()['image.pull']!({ ref: 'boot:1', dir: out }, { ...ctx, emit: (e) => events.push(e) })
      assert.ok((await readFile(join(out, 'initrd'))).equals(await readFile(f)))
      assert.ok(events.length > 2)
      assert.equal((b.status().chunks as { images: number }).images, 1)
    } finally {
      await a.stop()
      await b.stop()
    }
  })

  it('image records from peers are decoded defensively', () => {
    const good = {
      v: 1 as const,
      name: 'a',
      tag: 'b',
      created: '',
      files: [{ name: 'k', manifest: 'a'.repeat(64), size: 1 }],
    }
    assert.equal(decodeImageRecord(encodeImageRecord(good)).files[0]!.name, 'k')
    for (const bad of [
      { ...good, files: [{ ...good.files[0], name: '../etc/passwd' }] },
      { ...good, files: [{ ...good.files[0], name: '..' }] },
      { ...good, files: [good.files[0], good.files[0]] },
      { ...good, name: 'has space' },
      { ...good, v: 2 },
      { ...good, files: [] },
    ])
      assert.throws(() => decodeImageRecord(Buffer.from(JSON.stringify(bad))), { name: 'ImageError' })
    assert.throws(() => decodeImageRecord(Buffer.from('{')), { name: 'ImageError' })
  })
})

describe('progress renderer', () => {
  const sink = (isTTY: boolean) => {
    const lines: string[] = []
    return { out: { isTTY, columns: 120, write: (s: string) => lines.push(s) }, lines }
  }

  it('--json: one object per line with rate and ETA, throttled, final always printed', () => {
    let t = 0
    const s = sink(false)
    const r = createProgressRenderer({ json: true, out: s.out, now: () => t, intervalMs: 500 })
    for (let i = 0; i <= 100; i++) {
      t = i * 50
      r.update({ phase: 'fetch', doneBytes: i * MiB, totalBytes: 100 * MiB, chunksSkipped: 3 })
    }
    r.done()
    const objs = s.lines.map((l) => JSON.parse(l) as ProgressEvent & { event: string })
    assert.ok(objs.length >= 9 && objs.length <= 13, `${objs.length} lines`)
    const last = objs[objs.length - 1]!
    assert.equal(last.doneBytes, 100 * MiB)
    assert.equal(last.chunksSkipped, 3)
    const mid = objs[5]!
    assert.ok(Math.abs(mid.rateBps! - 20 * MiB) < 2 * MiB, `rate ${mid.rateBps}`)
    assert.ok(mid.etaMs! > 0)
  })

  it('terminal: a bar line rewritten in place', () => {
    const s = sink(true)
    const r = createProgressRenderer({ out: s.out, label: 'pull x:1' })
    r.update({
      phase: 'fetch',
      doneBytes: 50 * MiB,
      totalBytes: 100 * MiB,
      rateBps: 10e6,
      bytesSkipped: 5 * MiB,
    })
    r.done()
    assert.ok(s.lines[0]!.startsWith('\r\u001b[2K'), 'the line is rewritten in place')
    assert.match(s.lines[0]!, /pull x:1 fetch \[#+\.+\]\s+50%/)
    assert.match(s.lines[0]!, /10\.0 MB\/s/)
    assert.match(s.lines[0]!, /bytesSkipped 5\.0 MiB/)
    assert.equal(s.lines[s.lines.length - 1], '\n')
    assert.ok(
      renderLine({ phase: 'x', doneBytes: 1, totalBytes: 2, rateBps: 0, etaMs: Number.NaN }, 40).length <= 40,
    )
    const m = new RateMeter()
    m.sample(0, 0)
    assert.equal(Math.round(m.sample(1000, 5e6)), 5e6)
  })
})

describe('mesh image command', () => {
  function fake() {
    const calls: { method: string; params: unknown }[] = []
    const client: ImageClient = {
      async call(method, params, opts) {
        calls.push({ method, params })
        opts?.onEvent?.({ phase: 'hash', doneBytes: 1, totalBytes: 2 })
        if (method === 'image.ls') return { images: [] }
        if (method === 'image.push') return { name: 'a', tag: 'b', files: [], created: '' }
        return { record: {}, bytesFetched: 0, bytesSkipped: 0, elapsedMs: 0, from: [] }
      },
    }
    const run = <T>(_o: unknown, fn: (c: ImageClient) => Promise<T>) => fn(client)
    return { calls, run }
  }

  it('push sends absolute paths and NAME:TAG; a bad reference is a usage error', async () => {
    const f = fake()
    const cmd = buildImageCommand(f.run)
    cmd.exitOverride()
    const write = process.stdout.write
    process.stdout.write = (() => true) as typeof process.stdout.write
    try {
      await cmd.parseAsync(['push', 'rel/k', '/abs/i', '--name', 'deb', '--json'], { from: 'user' })
      await assert.rejects(cmd.parseAsync(['pull', 'BAD REF'], { from: 'user' }), { name: 'UsageError' })
    } finally {
      process.stdout.write = write
    }
    assert.equal(f.calls[0]!.method, 'image.push')
    const p = f.calls[0]!.params as { files: string[]; ref: string }
    assert.equal(p.ref, 'deb:latest')
    assert.ok(p.files.every((x) => x.startsWith('/')))
    assert.equal(f.calls.length, 1)
  })
})
