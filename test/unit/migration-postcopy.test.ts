/**
 * Post-copy's two ends over an in-memory link, with a fake pager (the real one needs QEMU: see
 * test/system/postcopy-pager.test.ts): urgent chunks go before the background, every owed chunk arrives
 * exactly as the source's paused copy holds it, and a link cut in the middle is survived by going on
 * from what is still owed on a new session.
 */
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import { createLogger } from '../../src/base/log.ts'
import { Conversation } from '../../vm/migration/conversation.ts'
import type { MigrationChannel } from '../../vm/migration/interfaces.ts'
import { overlayMigrationNetwork } from '../../vm/migration/overlay.ts'
import { decodePostcopyChunk, PostcopyReceiver } from '../../vm/migration/postcopy-dest.ts'
import { bitmapChunks, chunkBitmap, PostcopyLender } from '../../vm/migration/postcopy-source.ts'
import { decodeMessage, newSessionId, PAGE_LITERAL, PAGE_ZERO } from '../../vm/migration/v1/messages.ts'
import type { Pager, PagerStats } from '../../vm/postcopy/pager.ts'

const CHUNK = 64 * 1024
const COUNT = 48

/** What mesh-uffd does, in memory: faults are raised by the test, fills are recorded. */
class FakePager implements Pager {
  qemuFd = 7
  regrabbed = false
  readonly failed = new Promise<never>(() => {})
  readonly placed = new Map<number, Buffer>()
  readonly order: number[] = []
  private readonly handlers = new Set<(c: number) => void>()
  finished = false
  /** Called after each fill with the number placed so far (a test cuts the link from here). */
  onPlaced: (placed: number) => void = () => {}
  async owe(bitmap: Uint8Array) {
    return { count: bitmapChunks(bitmap, COUNT).length, bitmap }
  }
  fill(chunk: number, bytes: Uint8Array): boolean {
    if (this.placed.has(chunk)) throw new Error(`chunk ${chunk} placed twice`)
    this.placed.set(chunk, Buffer.from(bytes))
    this.order.push(chunk)
    this.onPlaced(this.placed.size)
    return true
  }
  async drain() {}
  onFault(h: (c: number) => void) {
    this.handlers.add(h)
    return () => this.handlers.delete(h)
  }
  touch(chunk: number) {
    for (const h of this.handlers) h(chunk)
  }
  async finish(): Promise<PagerStats> {
    this.finished = true
    return { owedFaults: 0, zeroFaults: 0, filledChunks: this.placed.size, maxWaitUs: 0, totalWaitUs: 0 }
  }
  async quit() {}
}

/** A conversation on each end of the A–B link's migrate channel, messages routed by session id. */
function pair(a: MigrationChannel, b: MigrationChannel): { src: Conversation; dst: Conversation } {
  const sid = newSessionId()
  const src = new Conversation(a, sid)
  const dst = new Conversation(b, sid)
  a.onMessage((m) => src.deliver(decodeMessage(m), m.byteLength))
  b.onMessage((m) => dst.deliver(decodeMessage(m), m.byteLength))
  return { src, dst }
}

describe('post-copy lender and receiver (memory link, fake pager)', () => {
  let dir: string
  let ram: string
  let bytes: Buffer
  const log = createLogger({ level: 'error' })

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'mesh-pc-'))
    ram = join(dir, 'ram')
    bytes = randomBytes(COUNT * CHUNK)
    // Some zero pages, and one all-zero chunk: they travel as zero pages.
    bytes.fill(0, 5 * CHUNK, 6 * CHUNK)
    bytes.fill(0, 9 * CHUNK, 9 * CHUNK + 8192)
    writeFileSync(ram, bytes)
  })
  afterEach(() => rmSync(dir, { recursive: true, force: true }))

  /** A lender over this test's RAM file, one chunk's window unless the test says otherwise. */
  const lenderOf = (order: number[], o: Partial<ConstructorParameters<typeof PostcopyLender>[0]> = {}) =>
    new PostcopyLender({
      ramPath: ram,
      ramSize: COUNT * CHUNK,
      chunkSize: CHUNK,
      order,
      windowBytes: CHUNK,
      log,
      ...o,
    })

  it('urgent chunks first, then the rest hottest first; every byte as the source holds it', async () => {
    const net = createMemoryNetwork()
    net.connect('A', 'B')
    const a = overlayMigrationNetwork(net.node('A')).channel('B')!
    const b = overlayMigrationNetwork(net.node('B')).channel('A')!
    const { src, dst } = pair(a, b)
    const owed = [...Array(COUNT).keys()].filter((c) => c % 3 !== 1)
    const order = [...owed].reverse()
    const lender = lenderOf(order, { windowBytes: 2 * CHUNK })
    const pager = new FakePager()
    const receiver = new PostcopyReceiver(pager, owed, CHUNK, COUNT)
    lender.attach(src)
    receiver.attach(dst)
    const pumping = lender.pump()
    // The guest touches two chunks before the background starts: only those go. Wait for both to be
    // placed (an event, not a timer a loaded machine outruns), then check the lender sent nothing else.
    const twoPlaced = new Promise<void>((resolve) => {
      pager.onPlaced = (n) => {
        if (n === 2) resolve()
      }
    })
    pager.touch(9)
    pager.touch(30)
    pager.touch(1) // not owed: the pager itself zero-fills such pages, nothing is asked
    await twoPlaced
    // The acks of both go back and anything the lender would send on them comes over: the memory link
    // delivers from setImmediate and the lender reads the RAM file synchronously, so a few turns of the
    // event loop (an order, not a duration) are enough for a wrongly sent chunk to be placed.
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r))
    assert.deepEqual(pager.order, [9, 30])
    assert.equal(lender.stats.urgentChunks, 2, 'only the touched owed chunks were asked for')
    assert.equal(lender.stats.backgroundChunks, 0, 'nothing goes in the background before it starts')
    lender.startBackground()
    await pumping
    const stats = await receiver.complete
    receiver.sendDone(4, stats)
    const done = await lender.finished(5000)
    assert.equal(done.faults, 2)
    assert.equal(pager.finished, true)
    assert.deepEqual(
      pager.order.slice(2),
      order.filter((c) => c !== 9 && c !== 30),
      'hottest first after the urgent ones',
    )
    for (const c of owed)
      assert.ok(pager.placed.get(c)!.equals(bytes.subarray(c * CHUNK, (c + 1) * CHUNK)), `chunk ${c}`)
    assert.equal(lender.stats.urgentChunks, 2)
    assert.equal(lender.stats.backgroundChunks, owed.length - 2)
    lender.close()
    receiver.close()
  })

  it('a link cut half-way: both ends go on from what is still owed on a new session', async () => {
    const net = createMemoryNetwork()
    net.connect('A', 'B')
    const netA = overlayMigrationNetwork(net.node('A'))
    const netB = overlayMigrationNetwork(net.node('B'))
    const first = pair(netA.channel('B')!, netB.channel('A')!)
    const owed = [...Array(COUNT).keys()]
    const lender = lenderOf(owed, {
      // One chunk in flight, so the cut below certainly finds chunks unsent (a window that grew sent all
      // 48 before a timer-polled cut on a loaded CI machine: the pump then ended without an error).
      maxWindowBytes: CHUNK,
    })
    const pager = new FakePager()
    // Cut the link the moment a third is placed, from the receiving end, not after a timer's delay.
    pager.onPlaced = (n) => {
      if (n === COUNT / 3) net.disconnect('A', 'B')
    }
    const receiver = new PostcopyReceiver(pager, owed, CHUNK, COUNT)
    lender.attach(first.src)
    receiver.attach(first.dst)
    lender.startBackground()
    const pumping = lender.pump()
    await assert.rejects(pumping, { name: 'MigrationLinkError' })
    const placedBefore = pager.placed.size
    assert.ok(placedBefore < COUNT)
    // The guest waits on a chunk that did not come: it is asked again on the next session.
    const missing = owed.find((c) => !pager.placed.has(c))!
    pager.touch(missing)
    net.connect('A', 'B')
    const second = pair(netA.channel('B')!, netB.channel('A')!)
    receiver.attach(second.dst)
    lender.attach(second.src, receiver.owedBitmap())
    assert.equal(lender.remaining, COUNT - placedBefore)
    const again = lender.pump()
    await again
    const stats = await receiver.complete
    receiver.sendDone(4, stats)
    await lender.finished(5000)
    assert.equal(pager.placed.size, COUNT)
    assert.equal(pager.order[placedBefore], missing, 'the chunk the guest waits for goes first')
    for (const c of owed) assert.ok(pager.placed.get(c)!.equals(bytes.subarray(c * CHUNK, (c + 1) * CHUNK)))
    assert.equal(lender.stats.sessions, 2)
    lender.close()
    receiver.close()
  })

  it('the background window grows from its start while acknowledgements show no queue, up to its cap', async () => {
    const net = createMemoryNetwork()
    net.connect('A', 'B')
    const a = overlayMigrationNetwork(net.node('A')).channel('B')!
    const b = overlayMigrationNetwork(net.node('B')).channel('A')!
    const { src, dst } = pair(a, b)
    const owed = [...Array(COUNT).keys()]
    // A start of one chunk kept the push at one chunk per round trip (~15 MB/s at 30 ms): it must grow.
    const lender = lenderOf(owed, {
      maxWindowBytes: 8 * CHUNK,
      queueTargetMs: 10_000,
    })
    const pager = new FakePager()
    const receiver = new PostcopyReceiver(pager, owed, CHUNK, COUNT)
    lender.attach(src)
    receiver.attach(dst)
    lender.startBackground()
    await lender.pump()
    const stats = await receiver.complete
    receiver.sendDone(4, stats)
    await lender.finished(5000)
    assert.equal(pager.placed.size, COUNT)
    assert.equal(lender.stats.maxWindowBytes, 8 * CHUNK, 'grew to its cap, no further')
    assert.ok(lender.stats.minAckRttMs >= 0)
    lender.close()
    receiver.close()
  })

  it('a pcresume may not claim chunks that were never owed', () => {
    const lender = lenderOf([1, 2])
    const net = createMemoryNetwork()
    net.connect('A', 'B')
    const { src } = pair(
      overlayMigrationNetwork(net.node('A')).channel('B')!,
      overlayMigrationNetwork(net.node('B')).channel('A')!,
    )
    assert.throws(() => lender.attach(src, chunkBitmap([1, 3], COUNT)), { name: 'MigrationDecodeError' })
    lender.close()
  })

  it('decodes a pcdata chunk: zero pages zero, literal pages in order; a short literal block is refused', () => {
    const lit = randomBytes(2 * 4096)
    const kinds = new Uint8Array(16).fill(PAGE_ZERO)
    kinds[3] = PAGE_LITERAL
    kinds[15] = PAGE_LITERAL
    const out = decodePostcopyChunk({ index: 0, deflated: false, kinds, refs: [], literal: lit }, CHUNK)
    assert.ok(out.subarray(3 * 4096, 4 * 4096).equals(lit.subarray(0, 4096)))
    assert.ok(out.subarray(15 * 4096).equals(lit.subarray(4096)))
    assert.ok(out.subarray(0, 3 * 4096).equals(Buffer.alloc(3 * 4096)))
    assert.throws(
      () =>
        decodePostcopyChunk(
          { index: 0, deflated: false, kinds, refs: [], literal: lit.subarray(0, 4096) },
          CHUNK,
        ),
      { name: 'MigrationDecodeError' },
    )
  })
})
