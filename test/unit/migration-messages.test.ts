import assert from 'node:assert/strict'
import fc from 'fast-check'
import { MigrationDecodeError } from '../../vm/migration/errors.ts'
import { RamEncoder, RamWriter } from '../../vm/migration/ram.ts'
import {
  applyStateDelta,
  decodeMessage,
  encodeDataMessage,
  encodeMessage,
  encodeStateDelta,
  HEADER_SIZE,
  type Message,
  MIGRATION_VERSION,
  newSessionId,
  PAGE_KEEP,
  PAGE_LITERAL,
  PAGE_REF,
  PAGE_ZERO,
} from '../../vm/migration/v1/messages.ts'
import { validateVmSpec } from '../../vm/spec.ts'

const sid = newSessionId()
const spec = validateVmSpec({ name: 'g1', memoryMiB: 16, kernel: '/k', ip: '10.0.0.2/24' })

const samples: Message[] = [
  {
    type: 'prepare',
    sid,
    spec,
    token: 3,
    ramSize: 16 * 1024 * 1024,
    chunkSize: 65536,
    pageSize: 4096,
    images: [],
    deadlineMs: 25_000,
    diskSince: '0123456789abcdef',
  },
  { type: 'accept', sid, cachedChunks: 0 },
  { type: 'refuse', sid, code: 'E_STALE_TOKEN', reason: 'stale' },
  { type: 'offer', sid, batch: 2, indices: [1, 5], hashes: new Uint8Array(64).fill(7) },
  { type: 'want', sid, batch: 2, indices: [5] },
  {
    type: 'data',
    sid,
    round: 1,
    chunks: [
      {
        index: 3,
        deflated: false,
        kinds: Uint8Array.from([1, 0, 2, 3]),
        refs: [99],
        literal: new Uint8Array(4096).fill(1),
      },
    ],
  },
  { type: 'round', sid, round: 1, chunks: 3, bytes: 196608 },
  { type: 'state', sid, offset: 0, total: 10, bytes: new Uint8Array(10).fill(9) },
  { type: 'stateref', sid, offset: 4, total: 10, bytes: new Uint8Array(6).fill(8) },
  { type: 'final', sid, token: 3, round: 2, pausedAt: 1700000000000 },
  { type: 'ready', sid, loadedAt: 1700000000001 },
  { type: 'commit', sid, token: 3 },
  { type: 'resumed', sid, token: 3, resumedAt: 1700000000002 },
  { type: 'abort', sid, code: 'E_X', reason: 'because' },
  { type: 'query', sid, vm: 'g1', token: 3 },
  { type: 'query-reply', sid, vm: 'g1', state: 'running', token: 3 },
  { type: 'ping', sid, t0: 1 },
  { type: 'pong', sid, t0: 1, t1: 2 },
  { type: 'locate', sid, vm: 'g1' },
  { type: 'locate-reply', sid, vm: 'g1', here: true, token: 1 },
  { type: 'request', sid, vm: 'g1', to: 'peer', deadlineMs: 25000 },
  { type: 'request-event', sid, event: { phase: 'bulk' } },
  { type: 'request-result', sid, ok: false, error: { code: 'E', message: 'm' } },
  { type: 'query-reply', sid, vm: 'g1', state: 'lost', token: 5 },
  { type: 'history', sid, vm: 'g1' },
  {
    type: 'history-reply',
    sid,
    vm: 'g1',
    token: 5,
    status: 'paused',
    lost: { token: 5, on: 'peerB' },
    events: [
      { at: 1, token: 4, event: 'out', peer: 'peerB' },
      { at: 2, token: 5, event: 'lost', peer: 'peerB', note: 'its QEMU died' },
    ],
  },
  // Post-copy and the move options (#15).
  {
    type: 'prepare',
    sid,
    spec,
    token: 4,
    ramSize: 16 * 1024 * 1024,
    chunkSize: 65536,
    pageSize: 4096,
    images: [],
    postcopy: true,
  },
  { type: 'accept', sid, cachedChunks: 0, postcopy: true },
  { type: 'final', sid, token: 4, round: 3, pausedAt: 1700000000000, postcopy: true },
  { type: 'owed', sid, chunks: 256, bitmap: new Uint8Array(32).fill(0x81) },
  { type: 'owed', sid, chunks: 13, bitmap: Uint8Array.from([0xff, 0x1f]) },
  { type: 'pcwant', sid, indices: [7, 3, 200] },
  {
    type: 'pcdata',
    sid,
    chunks: [
      {
        index: 7,
        deflated: false,
        kinds: Uint8Array.from([0, 1, 1, 0]),
        refs: [],
        literal: new Uint8Array(8192).fill(3),
      },
    ],
  },
  { type: 'pcack', sid, placed: 12 },
  { type: 'pcdone', sid, token: 4, faults: 10, maxWaitUs: 12345, zeroFaults: 2 },
  { type: 'pcresume', sid, vm: 'g1', token: 4 },
  { type: 'query-reply', sid, vm: 'g1', state: 'postcopy', token: 4 },
  { type: 'query-reply', sid, vm: 'g1', state: 'lost', token: 4 },
  {
    type: 'request',
    sid,
    vm: 'g1',
    to: 'peer',
    deadlineMs: 60000,
    maxPauseMs: 500,
    bestEffort: true,
    mode: 'postcopy',
  },
]

/** Typed arrays as plain arrays: the decoder may return Buffers where the sample has Uint8Arrays. */
function norm(v: unknown): unknown {
  if (v instanceof Uint8Array) return Array.from(v)
  if (Array.isArray(v)) return v.map(norm)
  if (typeof v === 'object' && v !== null)
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, norm(x)]))
  return v
}

let zdata: Buffer<ArrayBufferLike> | undefined
let zstate: Buffer<ArrayBufferLike> | undefined

/** A device-state-like blob: a large fixed part (ROMs) and a small part that changes (registers). */
function deviceState(seed: number, len = 300_000): Buffer {
  const b = Buffer.alloc(len)
  for (let i = 0; i < len; i++) b[i] = (i * 31 + (i >> 9)) & 0xff
  for (let i = len - 2000; i < len; i += 7) b[i] = (seed * 131 + i) & 0xff
  return b
}

describe('migration protocol v1', () => {
  it('round-trips every message type', () => {
    for (const m of samples) assert.deepEqual(norm(decodeMessage(encodeMessage(m))), norm(m), m.type)
  })

  it('refuses other versions, unknown types, truncation and trailing bytes with MigrationDecodeError', () => {
    const b = Buffer.from(encodeMessage(samples[4]!))
    const v2 = Buffer.from(b)
    v2[0] = MIGRATION_VERSION + 1
    assert.throws(() => decodeMessage(v2), { name: 'MigrationDecodeError', message: /version/ })
    const t = Buffer.from(b)
    t[1] = 200
    assert.throws(() => decodeMessage(t), { name: 'MigrationDecodeError', message: /type/ })
    assert.throws(() => decodeMessage(b.subarray(0, b.length - 1)), { name: 'MigrationDecodeError' })
    assert.throws(() => decodeMessage(Buffer.concat([b, Buffer.from([0])])), { name: 'MigrationDecodeError' })
    assert.throws(() => decodeMessage(b.subarray(0, HEADER_SIZE - 1)), { name: 'MigrationDecodeError' })
  })

  it('post-copy messages: pcdata carries zero and literal pages only, owed is bounded, options are checked', () => {
    const withRef = {
      type: 'pcdata',
      sid,
      chunks: [
        { index: 1, deflated: false, kinds: Uint8Array.from([2]), refs: [5], literal: new Uint8Array(0) },
      ],
    } as Message
    assert.throws(() => encodeMessage(withRef), RangeError)
    // A 'data' body relabelled as pcdata (a KEEP page) is refused by the decoder.
    const data = Buffer.from(
      encodeMessage({
        type: 'data',
        sid,
        round: 0,
        chunks: [
          {
            index: 1,
            deflated: false,
            kinds: Uint8Array.from([3, 1]),
            refs: [],
            literal: new Uint8Array(4096),
          },
        ],
      }),
    )
    data[1] = Buffer.from(encodeMessage(samples.find((m) => m.type === 'pcdata')!))[1]!
    assert.throws(() => decodeMessage(data), { name: 'MigrationDecodeError', message: /pcdata: page kind 3/ })
    const owed = Buffer.from(encodeMessage({ type: 'owed', sid, chunks: 8, bitmap: new Uint8Array(1) }))
    owed.writeUInt32BE(0xffffffff, HEADER_SIZE)
    assert.throws(() => decodeMessage(owed), { name: 'MigrationDecodeError', message: /owed/ })
    assert.throws(
      () => encodeMessage({ type: 'owed', sid, chunks: 9, bitmap: new Uint8Array(1) }),
      RangeError,
    )
    const req = Buffer.from(encodeMessage({ type: 'request', sid, vm: 'g1', to: 'p' }))
    const body = JSON.stringify({ vm: 'g1', to: 'p', mode: 'sideways' })
    const bad = Buffer.concat([req.subarray(0, HEADER_SIZE), Buffer.from(body)])
    assert.throws(() => decodeMessage(bad), { name: 'MigrationDecodeError', message: /mode/ })
  })

  it('refuses a prepare whose RAM size does not match the spec, and huge counts without allocating', () => {
    const bad = { ...samples[0]!, ramSize: 1 } as Message
    assert.throws(() => decodeMessage(encodeMessage(bad)), { name: 'MigrationDecodeError' })
    const since = { ...samples[0]!, diskSince: '../x' } as Message
    assert.throws(() => decodeMessage(encodeMessage(since)), {
      name: 'MigrationDecodeError',
      message: /diskSince/,
    })
    const offer = Buffer.from(encodeMessage(samples[3]!))
    offer.writeUInt32BE(0xffffffff, HEADER_SIZE + 4)
    assert.throws(() => decodeMessage(offer), { name: 'MigrationDecodeError', message: /exceeds/ })
  })

  it('a compressible data message travels as zdata and decodes to the same data', async () => {
    const m = samples[5] as Extract<Message, { type: 'data' }>
    const { bytes, compressed } = await encodeDataMessage(m, true)
    assert.ok(compressed && bytes.byteLength < 1000, `zdata of ${bytes.byteLength} bytes`)
    assert.deepEqual(norm(decodeMessage(bytes)), norm(m))
    zdata = Buffer.from(bytes)
  })

  it('device state as zstate: against the reference only the difference travels, and it must match', async () => {
    const ref = deviceState(1)
    const state = deviceState(2)
    const plain = await encodeStateDelta(sid, state)
    const delta = await encodeStateDelta(sid, state, ref)
    assert.ok(plain !== undefined && delta !== undefined)
    assert.ok(
      delta.byteLength < plain.byteLength / 4,
      `delta ${delta.byteLength} B vs plain ${plain.byteLength} B`,
    )
    zstate = Buffer.from(delta)
    const m = decodeMessage(delta)
    assert.equal(m.type, 'zstate')
    if (m.type !== 'zstate') return
    assert.ok(applyStateDelta(m, ref).equals(state))
    // Without the reference, or with another one, the state is refused (never loaded wrong).
    assert.throws(() => applyStateDelta(m), { name: 'MigrationDecodeError', message: /reference/ })
    assert.throws(() => applyStateDelta(m, deviceState(3)), { name: 'MigrationDecodeError', message: /hash/ })
    // A reference shorter or longer than the state still reproduces it exactly.
    for (const other of [ref.subarray(0, 1000), Buffer.concat([ref, Buffer.alloc(5000, 1)])]) {
      const d = decodeMessage((await encodeStateDelta(sid, state, other))!)
      assert.ok(d.type === 'zstate' && applyStateDelta(d, other).equals(state))
    }
    const p = decodeMessage(plain)
    assert.ok(p.type === 'zstate' && !p.xor && applyStateDelta(p).equals(state))
    // The inflated size is bounded by the announced total: a body that inflates further is refused.
    const lie = Buffer.from(plain)
    lie.writeUInt32BE(state.byteLength - 1, HEADER_SIZE)
    assert.throws(() => decodeMessage(lie), { name: 'MigrationDecodeError', message: /inflate/ })
    // Incompressible and large: does not fit one message, the caller sends plain 'state' pieces.
    const noise = Buffer.from(crypto.getRandomValues(new Uint8Array(60_000)))
    assert.equal(await encodeStateDelta(sid, Buffer.concat([noise, noise, noise, noise, noise])), undefined)
  })

  it('fuzz: random bytes and mutated messages decode or fail with MigrationDecodeError only', () => {
    const encoded: Buffer<ArrayBufferLike>[] = samples.map((m) => Buffer.from(encodeMessage(m)))
    if (zdata !== undefined) encoded.push(zdata)
    if (zstate !== undefined) encoded.push(zstate)
    fc.assert(
      fc.property(
        fc.oneof(
          fc.uint8Array({ maxLength: 600 }).map((u) => {
            const b = Buffer.from(u)
            if (b.length > 1) b[0] = MIGRATION_VERSION
            return b
          }),
          fc
            .tuple(
              fc.nat(encoded.length - 1),
              fc.array(fc.tuple(fc.nat(), fc.nat(255)), { maxLength: 6 }),
              fc.nat(),
            )
            .map(([i, flips, cut]) => {
              const b = Buffer.from(encoded[i]!)
              for (const [pos, v] of flips) b[pos % b.length] = v
              return cut % 4 === 0 ? b.subarray(0, cut % (b.length + 1)) : b
            }),
        ),
        (bytes) => {
          try {
            decodeMessage(bytes)
          } catch (err) {
            if (!(err instanceof MigrationDecodeError)) throw err
          }
        },
      ),
      { numRuns: 3000 },
    )
  })

  it('RAM codec: zero pages cost nothing, duplicates go as references, and a bad literal is refused', async () => {
    const { mkdtemp, writeFile, readFile, rm } = await import('node:fs/promises')
    const { tmpdir } = await import('node:os')
    const { join } = await import('node:path')
    const { randomBytes } = await import('node:crypto')
    const dir = await mkdtemp(join(tmpdir(), 'mig-ram-'))
    try {
      const size = 1024 * 1024
      const src = Buffer.alloc(size)
      const page = randomBytes(4096)
      page.copy(src, 0)
      page.copy(src, 8 * 4096)
      page.copy(src, 40 * 4096)
      Buffer.from('hello').copy(src, 70 * 4096)
      await writeFile(join(dir, 'src'), src)
      await writeFile(join(dir, 'dst'), Buffer.alloc(size))
      const enc = new RamEncoder(join(dir, 'src'), size, 65536, true)
      const w = new RamWriter(join(dir, 'dst'), size, 65536)
      const scan = await enc.scan()
      assert.deepEqual(scan.indices, [0, 2, 4])
      const chunks = await Promise.all(enc.encode(scan.indices))
      for (const c of chunks) w.apply(c)
      assert.ok((await readFile(join(dir, 'dst'))).equals(src))
      assert.equal(enc.stats.dupPages, 2)
      const lit = chunks.reduce((n, c) => n + c.literal.byteLength, 0)
      assert.ok(lit < 2 * 4096, `literal bytes ${lit}`)
      const broken = {
        ...chunks[0]!,
        deflated: false,
        kinds: Uint8Array.from(new Array(16).fill(PAGE_LITERAL)),
      }
      assert.throws(() => w.apply(broken), { name: 'MigrationDecodeError' })
      enc.close()
      w.close()
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('RAM codec: a chunk deferred out of the bulk copy is in the final delta even if unchanged since the scan; one filled from the cache after all is not', async () => {
    const { mkdtemp, writeFile, readFile, rm } = await import('node:fs/promises')
    const { tmpdir } = await import('node:os')
    const { join } = await import('node:path')
    const { randomBytes } = await import('node:crypto')
    const dir = await mkdtemp(join(tmpdir(), 'mig-defer-'))
    try {
      const size = 8 * 65536
      const src = randomBytes(size)
      await writeFile(join(dir, 'src'), src)
      await writeFile(join(dir, 'dst'), Buffer.alloc(size))
      const enc = new RamEncoder(join(dir, 'src'), size, 65536, false, false)
      const w = new RamWriter(join(dir, 'dst'), size, 65536)
      const scan = await enc.scan()
      assert.equal(scan.indices.length, 8)
      // Chunk 3: deferred (the guest wrote it after the tracker's baseline, before the scan), never
      // sent. Chunk 5: deferred, then the destination says it has it in its cache.
      enc.deferUnsent(3)
      enc.deferUnsent(5)
      enc.markFilled(5)
      w.fill(5, src.subarray(5 * 65536, 6 * 65536))
      const sent = scan.indices.filter((i) => i !== 3 && i !== 5)
      for (const c of await Promise.all(enc.encode(sent))) w.apply(c)
      assert.deepEqual(await enc.finalDelta(join(dir, 'src')), [3])
      for (const c of await Promise.all(enc.encode([3]))) w.apply(c)
      assert.ok((await readFile(join(dir, 'dst'))).equals(src))
      assert.deepEqual(await enc.finalDelta(join(dir, 'src')), [])
      enc.close()
      w.close()
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('RAM codec: a chunk filled from the cache costs no page hashing; sent again, it travels against the bytes the destination holds', async () => {
    const { mkdtemp, writeFile, readFile, rm } = await import('node:fs/promises')
    const { tmpdir } = await import('node:os')
    const { join } = await import('node:path')
    const { randomBytes } = await import('node:crypto')
    const dir = await mkdtemp(join(tmpdir(), 'mig-filled-'))
    const C = 65536
    const P = 4096
    try {
      const size = 4 * C
      const src = randomBytes(size)
      src.fill(0, C + 2 * P, C + 3 * P) // chunk 1, page 2: zeros
      await writeFile(join(dir, 'src'), src)
      await writeFile(join(dir, 'dst'), Buffer.alloc(size))
      const enc = new RamEncoder(join(dir, 'src'), size, C, false, false)
      const w = new RamWriter(join(dir, 'dst'), size, C)
      const scan = await enc.scan()
      assert.deepEqual(scan.indices, [0, 1, 2, 3])
      // The destination had chunks 1 and 2 in its cache: no page of them is hashed.
      for (const i of [1, 2]) {
        enc.markFilled(i)
        w.fill(i, src.subarray(i * C, (i + 1) * C))
      }
      assert.equal(enc.stats.hashedPages, 0)
      for (const c of await Promise.all(enc.encode([0, 3]))) w.apply(c)
      assert.equal(enc.stats.hashedPages, 32)
      enc.releaseScan()
      // The guest then writes into the filled chunks: chunk 1 gets a new page 5, its zero page 2 gets
      // bytes, its page 7 becomes zeros; chunk 2's page 0 becomes a copy of chunk 0's page 0 (sent, so
      // a reference); chunk 3's page 4 becomes a copy of chunk 2's unchanged page 9 (a reference once
      // chunk 2 is encoded before it: its filled pages got their keys then).
      randomBytes(P).copy(src, C + 5 * P)
      randomBytes(P).copy(src, C + 2 * P)
      src.fill(0, C + 7 * P, C + 8 * P)
      src.copy(src, 2 * C, 0, P)
      src.copy(src, 3 * C + 4 * P, 2 * C + 9 * P, 2 * C + 10 * P)
      await writeFile(join(dir, 'src'), src)
      const again = await Promise.all(enc.encode([1, 2, 3]))
      for (const c of again) w.apply(c)
      assert.ok((await readFile(join(dir, 'dst'))).equals(src))
      const expected1 = new Array(16).fill(PAGE_KEEP)
      expected1[2] = PAGE_LITERAL
      expected1[5] = PAGE_LITERAL
      expected1[7] = PAGE_ZERO
      assert.deepEqual(Array.from(again[0]!.kinds), expected1)
      assert.equal(again[1]!.kinds[0], PAGE_REF)
      assert.equal(again[1]!.kinds.filter((k) => k === PAGE_KEEP).length, 15)
      assert.equal(again[2]!.kinds[4], PAGE_REF)
      assert.equal(enc.stats.dupPages, 2)
      assert.equal(again[0]!.literal.byteLength + again[1]!.literal.byteLength, 2 * P)
      assert.deepEqual(await enc.finalDelta(join(dir, 'src')), [])
      enc.close()
      w.close()
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  for (const parallel of [false, true])
    it(`RAM codec: the final delta is what changed since each chunk was last sent, nothing more${parallel ? ' (scan worker)' : ''}`, async () => {
      const { mkdtemp, writeFile, readFile, rm, open } = await import('node:fs/promises')
      const { tmpdir } = await import('node:os')
      const { join } = await import('node:path')
      const dir = await mkdtemp(join(tmpdir(), 'mig-final-'))
      const poke = async (chunk: number, byte: number) => {
        const fh = await open(join(dir, 'src'), 'r+')
        await fh.write(Buffer.from([byte]), 0, 1, chunk * 65536 + 123)
        await fh.close()
      }
      try {
        const size = 1024 * 1024
        await writeFile(join(dir, 'src'), Buffer.alloc(size, 1))
        await writeFile(join(dir, 'dst'), Buffer.alloc(size))
        const enc = new RamEncoder(join(dir, 'src'), size, 65536, true, parallel)
        const w = new RamWriter(join(dir, 'dst'), size, 65536)
        const apply = async (indices: number[]) => {
          for (const c of await Promise.all(enc.encode(indices))) w.apply(c)
        }
        await apply((await enc.scan()).indices)
        enc.releaseScan()
        // A pre-copy round sends chunks 3 and 5 with new bytes; unchanged since, they are not in the delta.
        await poke(3, 7)
        await poke(12, 7)
        await apply([3, 12])
        assert.deepEqual(await enc.finalDelta(join(dir, 'src')), [])
        // Written after its round: in the delta. Restored to the first scan's bytes after its round: in
        // the delta too (the destination holds the round's bytes).
        await poke(3, 9)
        await poke(12, 1)
        const delta = await enc.finalDelta(join(dir, 'src'))
        assert.deepEqual(delta, [3, 12])
        await apply(delta)
        assert.ok((await readFile(join(dir, 'dst'))).equals(await readFile(join(dir, 'src'))))
        enc.close()
        w.close()
      } finally {
        await rm(dir, { recursive: true, force: true })
      }
    })
})
