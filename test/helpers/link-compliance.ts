/**
 * The Link contract (net/link/interfaces.ts) as one mocha suite that every implementation runs:
 * in-memory (test/unit/link-memory.test.ts) and WebRTC (test/system/webrtc-link.test.ts).
 */
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { ChannelClosedError } from '../../net/link/errors.ts'
import {
  type ChannelName,
  type Link,
  MAX_MESSAGE_SIZE,
  type MessageChannel,
} from '../../net/link/interfaces.ts'

export interface LinkPair {
  a: Link
  b: Link
  cleanup(): Promise<void>
}

export interface ComplianceOptions {
  /** Bytes pushed through the bulk test (default 32 MiB). */
  bulkBytes?: number
  /** Mocha timeout per test (default 60 s). */
  timeoutMs?: number
  /** Runs in a `before` hook (e.g. prerequisite checks). */
  before?: (ctx: Mocha.Context) => void | Promise<void>
}

const RELIABLE: ChannelName[] = ['control', 'chunks', 'migrate']

/** Deterministic content: byte i of message `seq` is (seq * 31 + i) & 0xff, first 4 bytes = seq. */
function pattern(seq: number, size: number): Uint8Array {
  const m = new Uint8Array(size)
  for (let i = 0; i < size; i++) m[i] = (seq * 31 + i) & 0xff
  if (size >= 4) new DataView(m.buffer).setUint32(0, seq)
  return m
}

function checkPattern(m: Uint8Array, seq: number, size: number): void {
  assert.equal(m.byteLength, size, `message ${seq}: length`)
  if (size >= 4) assert.equal(new DataView(m.buffer, m.byteOffset, 4).getUint32(0), seq, 'sequence (order)')
  for (let i = 4; i < size; i++) {
    if (m[i] !== ((seq * 31 + i) & 0xff)) assert.fail(`message ${seq}: byte ${i} corrupted`)
  }
}

function until(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now()
    const poll = () => {
      if (cond()) return resolve()
      if (Date.now() - t0 > timeoutMs) return reject(new Error(`timed out waiting for ${what}`))
      setTimeout(poll, 5)
    }
    poll()
  })
}

/** Sends until send() returns false (bounded); returns the number of bytes sent. */
function fillUntilFull(ch: MessageChannel, size = 64 * 1024, maxBytes = 256 * 1024 * 1024): number {
  let sent = 0
  const m = new Uint8Array(size)
  while (sent < maxBytes) {
    sent += size
    if (!ch.send(m)) return sent
  }
  throw new Error(`send() never returned false after ${sent} bytes`)
}

/** Streams `total` bytes over a reliable channel with backpressure; resolves with the SHA-256. */
async function pump(ch: MessageChannel, total: number, signal?: AbortSignal): Promise<string> {
  const hash = createHash('sha256')
  let seq = 0
  let sent = 0
  while (sent < total) {
    const size = Math.min(total - sent, 1 + ((seq * 7919) % (64 * 1024)))
    const m = pattern(seq++, size)
    hash.update(m)
    sent += size
    if (!ch.send(m)) await ch.onDrain({ signal })
  }
  return hash.digest('hex')
}

export function runLinkCompliance(
  name: string,
  makePair: () => Promise<LinkPair>,
  options: ComplianceOptions = {},
): void {
  const bulkBytes = options.bulkBytes ?? 32 * 1024 * 1024
  describe(`Link compliance: ${name}`, function () {
    this.timeout(options.timeoutMs ?? 60_000)
    let pair: LinkPair | undefined

    if (options.before !== undefined) {
      const hook = options.before
      before(async function () {
        await hook(this)
      })
    }

    beforeEach(async () => {
      pair = await makePair()
    })
    afterEach(async () => {
      await pair?.cleanup()
      pair = undefined
    })

    it('is open with every channel and reports a path', () => {
      const { a, b } = pair!
      assert.equal(a.state, 'open')
      assert.equal(b.state, 'open')
      for (const n of ['control', 'chunks', 'migrate', 'tunnel'] as const) {
        assert.equal(a.channel(n).name, n)
        assert.equal(a.channel(n).state, 'open')
        assert.equal(a.channel(n).reliable, n !== 'tunnel')
      }
      assert.ok(['host', 'srflx', 'prflx', 'relay', 'memory'].includes(a.path.type))
    })

    it('delivers messages intact and in order, both ways, on every reliable channel', async () => {
      const { a, b } = pair!
      const count = 200
      const sizeOf = (i: number) => 1 + ((i * 977) % 3000)
      const received = new Map<string, Uint8Array[]>()
      for (const [end, other] of [
        [a, 'b→a'],
        [b, 'a→b'],
      ] as const) {
        for (const ch of RELIABLE) {
          const list: Uint8Array[] = []
          received.set(`${other}:${ch}`, list)
          end.channel(ch).onMessage((m) => list.push(m.slice()))
        }
      }
      for (let i = 0; i < count; i++) {
        for (const ch of RELIABLE) {
          a.channel(ch).send(pattern(i, sizeOf(i)))
          b.channel(ch).send(pattern(i + 1000, sizeOf(i)))
        }
      }
      await until(() => [...received.values()].every((l) => l.length >= count), 30_000, 'all messages')
      for (const [key, list] of received) {
        assert.equal(list.length, count, key)
        const base = key.startsWith('a→b') ? 0 : 1000
        list.forEach((m, i) => {
          checkPattern(m, i + base, sizeOf(i))
        })
      }
    })

    it('carries messages up to MAX_MESSAGE_SIZE and refuses larger ones', async () => {
      const { a, b } = pair!
      const sizes = [MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE - 1, 65_537, 0]
      const got: Uint8Array[] = []
      b.channel('chunks').onMessage((m) => got.push(m.slice()))
      sizes.forEach((s, i) => {
        a.channel('chunks').send(pattern(i, s))
      })
      await until(() => got.length >= sizes.length, 30_000, 'large messages')
      sizes.forEach((s, i) => {
        checkPattern(got[i]!, i, s)
      })
      assert.throws(() => a.channel('chunks').send(new Uint8Array(MAX_MESSAGE_SIZE + 1)), {
        name: 'MessageTooLargeError',
      })
    })

    it('a send() buffer may be reused at once', async () => {
      const { a, b } = pair!
      const got: Uint8Array[] = []
      b.channel('control').onMessage((m) => got.push(m.slice()))
      const buf = new Uint8Array(100).fill(1)
      a.channel('control').send(buf)
      buf.fill(2)
      a.channel('control').send(buf)
      await until(() => got.length >= 2, 10_000, 'two messages')
      assert.ok(got[0]!.every((x) => x === 1))
      assert.ok(got[1]!.every((x) => x === 2))
    })

    it('send() returns false above the high-water mark and onDrain() resolves later', async () => {
      const { a, b } = pair!
      let received = 0
      b.channel('chunks').onMessage((m) => {
        received += m.byteLength
      })
      const ch = a.channel('chunks')
      const sent = fillUntilFull(ch)
      assert.ok(ch.bufferedAmount > 0, 'bufferedAmount reflects the backlog')
      let drained = false
      const p = ch.onDrain().then(() => {
        drained = true
      })
      await p
      assert.ok(drained)
      // A reliable channel accepted even the send that returned false: all of it arrives.
      await until(() => received === sent, 30_000, `${sent} bytes to arrive (got ${received})`)
    })

    it(`moves ${bulkBytes >> 20} MiB each way with backpressure, nothing lost or reordered`, async () => {
      const { a, b } = pair!
      const results = await Promise.all(
        [
          [a, b],
          [b, a],
        ].map(async ([from, to]) => {
          const hash = createHash('sha256')
          let got = 0
          let expectSeq = 0
          let done: () => void
          const all = new Promise<void>((r) => {
            done = r
          })
          to!.channel('chunks').onMessage((m) => {
            if (m.byteLength >= 4) {
              const seq = new DataView(m.buffer, m.byteOffset, 4).getUint32(0)
              if (seq !== expectSeq) throw new Error(`out of order: ${seq} != ${expectSeq}`)
            }
            expectSeq++
            hash.update(m)
            got += m.byteLength
            if (got >= bulkBytes) done()
          })
          const t0 = performance.now()
          const sentHash = await pump(from!.channel('chunks'), bulkBytes)
          await all
          const secs = (performance.now() - t0) / 1000
          return { ok: sentHash === hash.digest('hex') && got === bulkBytes, mbps: bulkBytes / 1e6 / secs }
        }),
      )
      for (const r of results) assert.ok(r.ok, 'received stream equals sent stream')
    })

    it('the unreliable channel delivers', async () => {
      const { a, b } = pair!
      const ch = a.channel('tunnel')
      assert.equal(ch.reliable, false)
      let got = 0
      const seen = new Set<number>()
      b.channel('tunnel').onMessage((m) => {
        got++
        seen.add(new DataView(m.buffer, m.byteOffset, 4).getUint32(0))
      })
      for (let i = 0; i < 100; i++) {
        ch.send(pattern(i, 1400))
        if (i % 10 === 9) await new Promise((r) => setTimeout(r, 5))
      }
      await until(() => got >= 90, 10_000, 'most tunnel messages').catch(() => {})
      assert.ok(got >= 50, `only ${got} of 100 unreliable messages arrived on an idle link`)
      assert.equal(seen.size, got, 'no duplicates')
      // And back.
      let back = 0
      a.channel('tunnel').onMessage(() => {
        back++
      })
      b.channel('tunnel').send(pattern(0, 100))
      await until(() => back >= 1, 5_000, 'a reply').catch(() => {})
      assert.ok(back >= 1 || got >= 50)
    })

    it('close propagates to both sides; send on a closed channel throws ChannelClosedError', async () => {
      const { a, b } = pair!
      let aClosed = false
      let bClosed = false
      let bChannelClosed = false
      a.onClose(() => {
        aClosed = true
      })
      b.onClose(() => {
        bClosed = true
      })
      b.channel('control').onClose(() => {
        bChannelClosed = true
      })
      a.close()
      assert.equal(a.state, 'closed')
      await until(() => aClosed && bClosed && bChannelClosed, 10_000, 'both ends to close')
      assert.equal(b.state, 'closed')
      for (const end of [a, b]) {
        for (const n of ['control', 'tunnel'] as const) {
          assert.equal(end.channel(n).state, 'closed')
          assert.throws(() => end.channel(n).send(new Uint8Array(1)), ChannelClosedError)
        }
      }
      await assert.rejects(a.channel('control').onDrain(), { name: 'ChannelClosedError' })
      // onClose registered after close still fires.
      let late = false
      a.onClose(() => {
        late = true
      })
      await until(() => late, 1000, 'late onClose')
    })

    it('onDrain() rejects with AbortError on abort and ChannelClosedError on close', async () => {
      const { a } = pair!
      const ch = a.channel('migrate')
      const pre = new AbortController()
      pre.abort()
      fillUntilFull(ch)
      await assert.rejects(ch.onDrain({ signal: pre.signal }), { name: 'AbortError' })
      const ac = new AbortController()
      const p = ch.onDrain({ signal: ac.signal })
      ac.abort()
      await assert.rejects(p, { name: 'AbortError' })
      // Still full (or nearly so): a pending onDrain rejects when the link closes.
      fillUntilFull(ch)
      const q = ch.onDrain()
      a.close()
      await assert.rejects(q, { name: 'ChannelClosedError' })
    })
  })
}
