/**
 * A werift link end and a libdatachannel link end form one link (issue 8): same Signaling and v1
 * messages, same pre-negotiated channels and heartbeat. Both directions of initiator; data both ways
 * on every channel, message sizes up to MAX_MESSAGE_SIZE; the whole Link compliance suite on a mixed
 * pair; the no-retransmit tunnel channel under loss.
 */
import assert from 'node:assert/strict'
import { CHANNEL_NAMES, type Link, MAX_MESSAGE_SIZE } from '../../net/link/interfaces.ts'
import { createWebRtcLink, type WebRtcLink } from '../../net/webrtc/link.ts'
import { createMemorySignalingPair } from '../../net/webrtc/memory-signaling.ts'
import type { WeriftConnection } from '../../net/webrtc/werift/engine.ts'
import { runLinkCompliance } from '../helpers/link-compliance.ts'
import { holdsWithin } from '../helpers/wait.ts'

type Engine = 'werift' | 'libdatachannel'
type AnyLink = WebRtcLink

async function mixedPair(initiator: Engine): Promise<{ a: AnyLink; b: AnyLink }> {
  const sig = createMemorySignalingPair()
  const make = (engine: Engine, init: boolean, s: typeof sig.a, peer: string) =>
    engine === 'werift'
      ? createWebRtcLink({ peer, initiator: init, signaling: s, iceAdditionalHostAddresses: ['127.0.0.1'] })
      : createWebRtcLink({ peer, initiator: init, signaling: s, engine: 'libdatachannel' })
  const other: Engine = initiator === 'werift' ? 'libdatachannel' : 'werift'
  const [a, b] = await Promise.all([
    make(initiator, true, sig.a, 'peer-b'),
    make(other, false, sig.b, 'peer-a'),
  ])
  return { a, b }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

const until = (cond: () => boolean, timeoutMs: number) => holdsWithin(cond, timeoutMs, 10)

function stamp(size: number, tag: number): Uint8Array {
  const m = new Uint8Array(size)
  for (let i = 0; i < size; i++) m[i] = (tag + i * 13) & 0xff
  return m
}

function sameAs(m: Uint8Array, size: number, tag: number): boolean {
  if (m.byteLength !== size) return false
  for (let i = 0; i < size; i++) if (m[i] !== ((tag + i * 13) & 0xff)) return false
  return true
}

const SIZES = [0, 1, 1199, 1200, 65_536, 200_000, MAX_MESSAGE_SIZE - 1, MAX_MESSAGE_SIZE]

for (const initiator of ['werift', 'libdatachannel'] as const) {
  describe(`webrtc interop: ${initiator} initiates`, function () {
    this.timeout(120_000)
    let pair: { a: AnyLink; b: AnyLink } | undefined
    afterEach(async () => {
      if (pair) await Promise.all([pair.a.destroy(), pair.b.destroy()])
      pair = undefined
    })

    it('connects, reports a path and heartbeats both ways', async () => {
      pair = await mixedPair(initiator)
      const { a, b } = pair
      assert.equal(a.state, 'open')
      assert.equal(b.state, 'open')
      assert.equal(a.session, b.session)
      assert.ok(['host', 'prflx', 'srflx'].includes(a.path.type))
      assert.ok(await until(() => a.rttMs !== undefined && b.rttMs !== undefined, 10_000), 'pongs both ways')
    })

    it('carries every size up to MAX_MESSAGE_SIZE both ways on every reliable channel', async () => {
      pair = await mixedPair(initiator)
      const { a, b } = pair
      const reliable = CHANNEL_NAMES.filter((n) => n !== 'tunnel')
      for (const [from, to, dir] of [
        [a, b, 0],
        [b, a, 1],
      ] as [Link, Link, number][]) {
        for (const name of reliable) {
          const got: Uint8Array[] = []
          const off = to.channel(name).onMessage((m) => got.push(m.slice()))
          SIZES.forEach((s, i) => {
            from.channel(name).send(stamp(s, dir * 100 + i))
          })
          const ok = await until(() => got.length >= SIZES.length, 60_000)
          off()
          assert.ok(ok, `${name} dir ${dir}: got ${got.length} of ${SIZES.length}`)
          SIZES.forEach((s, i) => {
            assert.ok(
              sameAs(got[i]!, s, dir * 100 + i),
              `${name} dir ${dir}: message ${i} (${s} bytes) intact`,
            )
          })
        }
      }
    })

    it('the unordered no-retransmit tunnel channel carries frames both ways', async () => {
      pair = await mixedPair(initiator)
      const { a, b } = pair
      for (const [from, to] of [
        [a, b],
        [b, a],
      ] as [Link, Link][]) {
        const seen = new Set<number>()
        let got = 0
        to.channel('tunnel').onMessage((m) => {
          got++
          if (m.byteLength === 1400) seen.add(new DataView(m.buffer, m.byteOffset).getUint32(0))
        })
        for (let i = 0; i < 100; i++) {
          const m = new Uint8Array(1400)
          new DataView(m.buffer).setUint32(0, i)
          from.channel('tunnel').send(m)
          if (i % 10 === 9) await sleep(5)
        }
        await until(() => got >= 100, 5000)
        process.stdout.write(`      ${got} of 100 frames arrived\n`)
        assert.ok(seen.size >= 50, `only ${seen.size} of 100 frames on an idle link`)
        assert.equal(seen.size, got, 'no duplicates')
      }
    })

    it('a close on either end reaches the other', async () => {
      pair = await mixedPair(initiator)
      const { a, b } = pair
      let reason: Error | undefined
      a.onClose((r) => {
        reason = r
      })
      b.close()
      assert.ok(await until(() => a.state === 'closed', 10_000), 'initiator end closed')
      assert.equal(reason?.name, 'LinkClosedByPeerError')
    })
  })
}

runLinkCompliance(
  'webrtc interop (werift initiator ↔ libdatachannel)',
  async () => {
    const { a, b } = await mixedPair('werift')
    return {
      a,
      b,
      async cleanup() {
        await Promise.all([a.destroy(), b.destroy()])
      },
    }
  },
  { bulkBytes: 4 * 1024 * 1024, timeoutMs: 120_000 },
)

/** Drops a fraction of a werift end's outgoing DTLS application-data records (the SCTP packets). */
function dropOutgoing(link: WebRtcLink, rate: number): { dropped: number } {
  const stats = { dropped: 0 }
  let seed = 12345
  const random = () => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0
    return seed / 4294967296
  }
  for (const s of (link.connection as WeriftConnection).udpSockets()) {
    {
      const orig = s.send.bind(s) as (...args: unknown[]) => void
      ;(s as unknown as { send: (...args: unknown[]) => void }).send = (...args: unknown[]) => {
        const data = args[0]
        if (Buffer.isBuffer(data) && data[0] === 23 && random() < rate) {
          stats.dropped++
          ;(args.find((x) => typeof x === 'function') as (() => void) | undefined)?.()
          return
        }
        orig(...args)
      }
    }
  }
  return stats
}

describe('webrtc interop: tunnel channel under loss (werift → libdatachannel)', function () {
  this.timeout(120_000)

  it('drops frames instead of retransmitting them, and the link keeps working', async () => {
    const { a, b } = await mixedPair('werift')
    try {
      const w = a as WebRtcLink
      const loss = dropOutgoing(w, 0.1)
      let got = 0
      b.channel('tunnel').onMessage(() => {
        got++
      })
      const n = 1000
      for (let i = 0; i < n; i++) {
        w.channel('tunnel').send(new Uint8Array(1000).fill(i & 0xff))
        if (i % 20 === 19) await sleep(5)
      }
      // A retransmitting channel would deliver all n within a few RTOs; give it ample time to try.
      await sleep(3000)
      process.stdout.write(`      ${got} of ${n} frames arrived, ${loss.dropped} packets dropped\n`)
      assert.ok(loss.dropped > 0, 'loss was injected')
      assert.ok(got < n, `all ${n} frames arrived despite ${loss.dropped} dropped packets: retransmitted`)
      assert.ok(got > n * 0.5, `only ${got} of ${n} frames arrived at 10% loss`)
      // The association did not stall: reliable data still flows both ways (retransmitted as needed).
      const back: number[] = []
      const fwd: number[] = []
      a.channel('control').onMessage((m) => back.push(m.byteLength))
      b.channel('control').onMessage((m) => fwd.push(m.byteLength))
      for (let i = 0; i < 20; i++) {
        w.channel('control').send(new Uint8Array(3000))
        b.channel('control').send(new Uint8Array(3000))
      }
      assert.ok(
        await until(() => back.length === 20 && fwd.length === 20, 60_000),
        `${fwd.length}/${back.length}`,
      )
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })
})
