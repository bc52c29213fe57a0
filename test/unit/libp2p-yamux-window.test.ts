/**
 * patches/@chainsafe+libp2p-yamux: a receiver sends a window update once at least half of its stream's
 * receive window is consumed (as Go yamux does), not after every data frame. Stock yamux 8 sent one per
 * frame: on a bulk direct path the puller wrote ~1.8 tiny noise messages per MB back through both NATs
 * and woke the holder for each. These tests run real libp2p nodes (TCP + noise + yamux) on loopback and
 * count the frames the receiving stream sends; they hold on any machine speed (counts, not times).
 */
import '../../net/polyfill.ts'
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import type { Stream } from '@libp2p/interface'
import { tcp } from '@libp2p/tcp'
import { createLibp2p, type Libp2p } from 'libp2p'

const PROTOCOL = '/mesh-test/yamux-window/1'
/** yamux's initial stream window (spec): the smallest window a receiver ever has. */
const INITIAL_WINDOW = 256 * 1024
const WINDOW_UPDATE = 1 // yamux frame type
const SYN = 1
const ACK = 2

interface FrameHeader {
  type: number
  flag: number
  length: number
}
/** The YamuxStream fields the test reads or wraps (its frames go out through an instance field). */
interface YamuxStreamInternals {
  sendFrame(header: FrameHeader, data?: unknown): boolean
  handleData(frame: { header: FrameHeader }): void
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n)
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff
  return b
}

function node(): Promise<Libp2p> {
  return createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    connectionMonitor: { enabled: false },
  })
}

interface Received {
  /** The receiving stream (for pause/resume). */
  stream: Stream
  /** Window updates it sent that carry no flag (the ones the patch thins out). */
  updates: number[]
  dataFrames: number
  /** Resolves with the sha256 of everything received once `total` bytes came. */
  done: Promise<string>
}

/** Registers a receiver that counts its stream's frames and hashes what it gets. */
function receive(b: Libp2p, total: number): Promise<Received> {
  return new Promise((accept) => {
    void b.handle(PROTOCOL, (stream) => {
      const y = stream as unknown as YamuxStreamInternals
      const hash = createHash('sha256')
      let got = 0
      const done = new Promise<string>((resolve) => {
        stream.addEventListener('message', (evt) => {
          for (const buf of evt.data instanceof Uint8Array ? [evt.data] : evt.data) hash.update(buf)
          got += evt.data.byteLength
          if (got >= total) resolve(hash.digest('hex'))
        })
      })
      const r: Received = { stream, updates: [], dataFrames: 0, done }
      const send = y.sendFrame.bind(y)
      y.sendFrame = (h, d) => {
        if (h.type === WINDOW_UPDATE && (h.flag & (SYN | ACK)) === 0) r.updates.push(h.length)
        return send(h, d)
      }
      const handle = y.handleData.bind(y)
      y.handleData = (f) => {
        r.dataFrames++
        handle(f)
      }
      accept(r)
    })
  })
}

/** Sends `count` messages of `size` bytes, waiting for the stream's drain EVENT when it says so. */
async function sendAll(stream: Stream, count: number, size: number, onBlocked?: () => void): Promise<string> {
  const hash = createHash('sha256')
  for (let i = 0; i < count; i++) {
    const m = pattern(size, i)
    hash.update(m)
    if (!stream.send(m)) {
      onBlocked?.()
      await once(stream as unknown as EventTarget, 'drain')
    }
  }
  return hash.digest('hex')
}

describe('yamux: a window update once half the window is consumed (patches/@chainsafe+libp2p-yamux)', () => {
  let nodes: Libp2p[] = []
  afterEach(async () => {
    await Promise.all(nodes.map((n) => n.stop()))
    nodes = []
  })

  it('sends far fewer window updates than data frames, each for at least half the initial window', async function () {
    this.timeout(60_000)
    nodes = [await node(), await node()]
    const [a, b] = nodes as [Libp2p, Libp2p]
    const SIZE = 16 * 1024
    const COUNT = 512 // 8 MiB in 16 KiB frames: 32 initial windows
    const received = receive(b, SIZE * COUNT)
    const stream = await a.dialProtocol(b.getMultiaddrs()[0]!, PROTOCOL)
    const sent = await sendAll(stream, COUNT, SIZE)
    const r = await received
    assert.equal(await r.done, sent, 'every byte arrives, in order')
    // Sends that find the window open go out one frame each; only what waited for the window is merged.
    assert.ok(r.dataFrames >= 64, `the sender's 16 KiB sends came as small frames (${r.dataFrames})`)
    // Stock yamux: one update per data frame (~dataFrames). Patched: one per half window or more.
    assert.ok(
      r.updates.length * 4 <= r.dataFrames,
      `${r.updates.length} window updates for ${r.dataFrames} data frames`,
    )
    for (const len of r.updates) assert.ok(len >= INITIAL_WINDOW / 2, `an update of only ${len} bytes`)
    await stream.close()
  })

  it('a receiver that pauses reading stops the sender, and resuming lets every byte through', async function () {
    this.timeout(60_000)
    nodes = [await node(), await node()]
    const [a, b] = nodes as [Libp2p, Libp2p]
    const SIZE = 64 * 1024
    const COUNT = 128 // 8 MiB
    const received = receive(b, SIZE * COUNT)
    const stream = await a.dialProtocol(b.getMultiaddrs()[0]!, PROTOCOL)
    const r = await received
    r.stream.pause() // no window update while paused: the sender must run out of window and wait
    let blocked = false
    const sending = sendAll(stream, COUNT, SIZE, () => {
      if (blocked) return
      blocked = true
      r.stream.resume()
    })
    const sent = await sending
    assert.ok(blocked, 'the sender was told to wait while the receiver paused')
    assert.equal(await r.done, sent, 'every byte arrives, in order')
    await stream.close()
  })
})
