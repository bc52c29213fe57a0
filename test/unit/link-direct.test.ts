import assert from 'node:assert/strict'
import { streamPair } from '@libp2p/utils'
import fc from 'fast-check'
import { FramedStream } from '../../net/control/stream.ts'
import { StreamChannel, SwitchableChannel } from '../../net/link/direct/channels.ts'
import { createPathLink, type PathLink } from '../../net/link/direct/link.ts'
import {
  DIRECT_CHANNELS,
  decodeHello,
  decodeSwitch,
  encodeHello,
  encodeSwitch,
  HELLO_BYTES,
} from '../../net/link/direct/v1/messages.ts'
import {
  type ChannelName,
  type Link,
  MAX_MESSAGE_SIZE,
  type MessageChannel,
} from '../../net/link/interfaces.ts'
import { createMemoryLinkPair } from '../../net/link/memory.ts'
import { runLinkCompliance } from '../helpers/link-compliance.ts'
import { waitUntil } from '../helpers/wait.ts'

/** Lets the memory links deliver what is queued (they run on setImmediate). */
const tick = () => new Promise((r) => setTimeout(r, 5))
const until = (cond: () => boolean, what: string) =>
  waitUntil(what, cond, { timeoutMs: 10_000, intervalMs: 5 })
const msg = (i: number) => {
  const m = new Uint8Array(8)
  new DataView(m.buffer).setUint32(0, i)
  return m
}
const num = (m: Uint8Array) => new DataView(m.buffer, m.byteOffset).getUint32(0)

/** The channels of a second memory link play the direct streams. */
function directFor(link: Link): Map<ChannelName, MessageChannel & { close(): void }> {
  const m = new Map<ChannelName, MessageChannel & { close(): void }>()
  // Memory channels have close(), as StreamChannel does.
  for (const n of DIRECT_CHANNELS) m.set(n, link.channel(n) as MessageChannel & { close(): void })
  return m
}

function upgradedPair(): { a: PathLink; b: PathLink; all: Link[] } {
  const rtc = createMemoryLinkPair('pa', 'pb')
  const tcp = createMemoryLinkPair('pa', 'pb')
  const a = createPathLink(rtc.a)
  const b = createPathLink(rtc.b)
  a.upgrade(directFor(tcp.a), { remote: '/ip4/192.0.2.1/tcp/1' })
  b.upgrade(directFor(tcp.b), { remote: '/ip4/192.0.2.2/tcp/1' })
  return { a, b, all: [a, b, tcp.a, tcp.b] }
}

describe('direct path v1 messages', () => {
  it('hello and switch header round-trip', () => {
    const token = new Uint8Array(16).fill(7)
    for (const channel of DIRECT_CHANNELS)
      assert.deepEqual(decodeHello(encodeHello({ channel, token })), { channel, token })
    for (const n of [0, 1, 2 ** 40, Number.MAX_SAFE_INTEGER]) assert.equal(decodeSwitch(encodeSwitch(n)), n)
  })
  it('refuses channels that must not go direct, wrong sizes and versions', () => {
    const token = new Uint8Array(16)
    assert.throws(() => encodeHello({ channel: 'tunnel', token }), { name: 'DirectDecodeError' })
    assert.throws(() => encodeHello({ channel: 'control', token }), { name: 'DirectDecodeError' })
    const h = encodeHello({ channel: 'chunks', token })
    h[0] = 2
    assert.throws(() => decodeHello(h), { name: 'DirectDecodeError' })
    h[0] = 1
    h[1] = 3 // tunnel's id
    assert.throws(() => decodeHello(h), { name: 'DirectDecodeError' })
    assert.throws(() => decodeHello(new Uint8Array(HELLO_BYTES + 1)), { name: 'DirectDecodeError' })
    const s = encodeSwitch(5)
    s.fill(0xff, 1)
    assert.throws(() => decodeSwitch(s), { name: 'DirectDecodeError' })
  })
  it('fuzz: arbitrary bytes decode or fail with DirectDecodeError, never anything else', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 40 }), (bytes) => {
        for (const decode of [decodeHello, decodeSwitch]) {
          try {
            decode(bytes)
          } catch (err) {
            assert.equal((err as Error).name, 'DirectDecodeError')
          }
        }
      }),
      { numRuns: 2000 },
    )
  })
})

describe('SwitchableChannel', () => {
  it('keeps order when the direct path overtakes the old one (peer switches mid-stream)', async () => {
    // The old path is slow (16 bytes per tick), the direct one fast: direct messages arrive first and must be
    // held until every old-path message is delivered.
    const slow = createMemoryLinkPair('pa', 'pb', { bytesPerTick: 16 })
    const fast = createMemoryLinkPair('pa', 'pb')
    const failures: Error[] = []
    const tx = new SwitchableChannel('chunks', slow.a.channel('chunks'), (e) => failures.push(e))
    const rx = new SwitchableChannel('chunks', slow.b.channel('chunks'), (e) => failures.push(e))
    const got: number[] = []
    rx.onMessage((m) => got.push(m.byteLength === 0 ? -1 : num(m)))
    for (let i = 0; i < 50; i++) tx.send(msg(i))
    tx.upgrade(fast.a.channel('chunks'))
    rx.upgrade(fast.b.channel('chunks'))
    for (let i = 50; i < 100; i++) tx.send(msg(i))
    tx.send(new Uint8Array(0)) // an empty message is an ordinary message on either path
    await until(() => got.length === 101, '101 messages')
    assert.deepEqual(got.slice(0, 100), [...Array(100).keys()])
    assert.deepEqual(failures, [])
    for (const l of [slow.a, slow.b, fast.a, fast.b]) l.close()
  })

  it('fails the link on old-path data after the switch, or a bad switch header', async () => {
    const old = createMemoryLinkPair('pa', 'pb')
    const direct = createMemoryLinkPair('pa', 'pb')
    const fail: Error[] = []
    const rx = new SwitchableChannel('chunks', old.b.channel('chunks'), (e) => fail.push(e))
    rx.onMessage(() => {})
    rx.upgrade(direct.b.channel('chunks'))
    direct.a.channel('chunks').send(encodeSwitch(0)) // "nothing came on the old path"
    await tick()
    old.a.channel('chunks').send(msg(1)) // ... but something does
    await until(() => fail.length === 1, 'failure')
    assert.equal(fail[0]?.name, 'DirectPathError')

    const rx2 = new SwitchableChannel('chunks', old.b.channel('migrate'), (e) => fail.push(e))
    rx2.upgrade(direct.b.channel('migrate'))
    direct.a.channel('migrate').send(new Uint8Array([9, 9, 9]))
    await until(() => fail.length === 2, 'bad header')
    assert.equal(fail[1]?.name, 'DirectDecodeError')
    for (const l of [old.a, old.b, direct.a, direct.b]) l.close()
  })

  it('closing the direct stream closes the whole PathLink', async () => {
    const { a, b, all } = upgradedPair()
    const reasons: (Error | undefined)[] = []
    a.onClose((r) => reasons.push(r))
    all[2]!.close() // the "direct connection" dies
    await until(() => a.state === 'closed', 'link closed')
    assert.equal(reasons[0]?.name, 'DirectPathError')
    assert.equal(a.base.state, 'closed')
    b.close()
  })

  it('reports the direct path and keeps control and tunnel on the base link', () => {
    const { a, b, all } = upgradedPair()
    assert.equal(a.path.direct, '/ip4/192.0.2.1/tcp/1')
    assert.equal(a.path.type, 'memory')
    assert.equal(a.channel('control'), a.base.channel('control'))
    assert.equal(a.channel('tunnel'), a.base.channel('tunnel'))
    assert.notEqual(a.channel('chunks'), a.base.channel('chunks'))
    for (const l of [a, b, ...all]) l.close()
  })
})

// The Link contract holds for a PathLink on its WebRTC path and after its bulk channels moved.
runLinkCompliance('path link (before upgrade, memory)', async () => {
  const rtc = createMemoryLinkPair('pa', 'pb')
  const a = createPathLink(rtc.a)
  const b = createPathLink(rtc.b)
  return {
    a,
    b,
    async cleanup() {
      a.close()
      b.close()
    },
  }
})

runLinkCompliance('path link (upgraded, memory)', async () => {
  const { a, b, all } = upgradedPair()
  return {
    a,
    b,
    async cleanup() {
      for (const l of all) l.close()
    },
  }
})

/** Direct channels as the node builds them: StreamChannels over libp2p stream pairs (yamux-like mocks). */
async function streamChannels(): Promise<{
  a: Map<ChannelName, StreamChannel>
  b: Map<ChannelName, StreamChannel>
}> {
  const a = new Map<ChannelName, StreamChannel>()
  const b = new Map<ChannelName, StreamChannel>()
  for (const n of DIRECT_CHANNELS) {
    // A small capacity so that send() meets backpressure within the compliance tests.
    const [x, y] = await streamPair({ capacity: 16 })
    a.set(n, new StreamChannel(n, new FramedStream(x, MAX_MESSAGE_SIZE)))
    b.set(n, new StreamChannel(n, new FramedStream(y, MAX_MESSAGE_SIZE)))
  }
  return { a, b }
}

describe('StreamChannel (coalesced frames over a libp2p stream)', () => {
  let chans: { a: Map<ChannelName, StreamChannel>; b: Map<ChannelName, StreamChannel> } | undefined
  afterEach(() => {
    for (const m of [chans?.a, chans?.b]) for (const c of m?.values() ?? []) c.close()
    chans = undefined
  })

  it('delivers messages sent in one turn, in many turns and over the coalescing limit, in order', async () => {
    chans = await streamChannels()
    const tx = chans.a.get('chunks')!
    const rx = chans.b.get('chunks')!
    const got: number[] = []
    let bytes = 0
    rx.onMessage((m) => {
      got.push(num(m))
      bytes += m.byteLength
    })
    // Sizes straddle the coalescing limit: several sends flush synchronously, the rest in microtasks.
    const sizes = [8, 1, MAX_MESSAGE_SIZE, 200_000, 70_000, 8, 5]
    let sent = 0
    let i = 0
    for (let round = 0; round < 12; round++) {
      for (const size of sizes) {
        const m = new Uint8Array(Math.max(4, size)).fill(round)
        new DataView(m.buffer).setUint32(0, i++)
        sent += m.byteLength
        if (!tx.send(m)) await tx.onDrain()
      }
      if (round % 3 === 0) await tick()
    }
    await until(() => got.length === i, `${i} messages (got ${got.length})`)
    assert.deepEqual(got, [...Array(i).keys()], 'in order, none lost or repeated')
    assert.equal(bytes, sent)
  })

  it('fuzz: any split of sends across turns arrives intact and in order', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.integer({ min: 4, max: 200_000 }), fc.boolean()), {
          minLength: 1,
          maxLength: 40,
        }),
        async (plan) => {
          const c = await streamChannels()
          try {
            const tx = c.a.get('migrate')!
            const rx = c.b.get('migrate')!
            const got: Uint8Array[] = []
            rx.onMessage((m) => got.push(Uint8Array.prototype.slice.call(m)))
            const sent: Uint8Array[] = []
            for (const [k, [size, yieldAfter]] of plan.entries()) {
              const m = new Uint8Array(size)
              for (let j = 0; j < size; j += 997) m[j] = (k * 31 + j) & 0xff
              new DataView(m.buffer).setUint32(0, k)
              sent.push(m.slice())
              if (!tx.send(m)) await tx.onDrain()
              m.fill(0xee) // the channel copied it: reusing the buffer must not change what arrives
              if (yieldAfter) await Promise.resolve()
            }
            await until(() => got.length === sent.length, 'all messages')
            for (const [k, m] of got.entries()) assert.ok(Buffer.from(m).equals(sent[k]!), `message ${k}`)
          } finally {
            for (const m of [c.a, c.b]) for (const ch of m.values()) ch.close()
          }
        },
      ),
      { numRuns: 25 },
    )
  })

  it('a clean close delivers what was sent in the same turn; send after close throws', async () => {
    chans = await streamChannels()
    const tx = chans.a.get('chunks')!
    const rx = chans.b.get('chunks')!
    const got: number[] = []
    rx.onMessage((m) => got.push(num(m)))
    let ended = false
    rx.onClose(() => {
      ended = true
    })
    for (let k = 0; k < 5; k++) tx.send(msg(k))
    tx.close()
    await until(() => got.length === 5, 'the five messages')
    assert.deepEqual(got, [0, 1, 2, 3, 4])
    assert.throws(() => tx.send(msg(9)), { name: 'ChannelClosedError' })
    await until(() => ended, 'the far end to see the close')
  })

  it('onDrain() with an aborted signal rejects with AbortError', async () => {
    chans = await streamChannels()
    const tx = chans.a.get('migrate')!
    chans.b.get('migrate')!.onMessage(() => {})
    while (tx.send(new Uint8Array(64 * 1024))) {}
    const ac = new AbortController()
    ac.abort()
    await assert.rejects(tx.onDrain({ signal: ac.signal }), { name: 'AbortError' })
    await tx.onDrain()
  })

  it('bufferedAmount counts frames not yet handed to the stream', async () => {
    chans = await streamChannels()
    const tx = chans.a.get('chunks')!
    chans.b.get('chunks')!.onMessage(() => {})
    assert.equal(tx.bufferedAmount, 0)
    tx.send(new Uint8Array(1000))
    assert.ok(tx.bufferedAmount >= 1004, `${tx.bufferedAmount}`)
    await until(() => tx.bufferedAmount === 0, 'the queue to empty')
  })
})
