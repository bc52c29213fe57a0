/**
 * The tunnel channel must never retransmit (issue 7): under loss its messages are dropped, not
 * delivered late, and nothing hangs. Stock werift 0.24.4 gets this wrong (maxRetransmits: 0 treated as
 * reliable; abandoning marks the wrong chunk, which can hang the association); patches/ fixes it and
 * this test proves the fix. Loss is injected in-process, on the UDP sockets of one link end, after the
 * connection is up: only DTLS application-data records (SCTP packets) are dropped.
 */
import assert from 'node:assert/strict'
import { createWebRtcLink, type WebRtcLink } from '../../net/webrtc/link.ts'
import { createMemorySignalingPair } from '../../net/webrtc/memory-signaling.ts'
import type { WeriftConnection } from '../../net/webrtc/werift/engine.ts'
import { prng } from '../helpers/prng.ts'
import { holdsWithin } from '../helpers/wait.ts'

interface LossInjector {
  rate: number
  dropped: number
  passed: number
}

/** Wraps every ICE UDP socket of a link end so that a fraction of outgoing SCTP packets vanish. */
function injectLoss(link: WebRtcLink, rate: number, random: () => number): LossInjector {
  const inj: LossInjector = { rate, dropped: 0, passed: 0 }
  for (const s of (link.connection as WeriftConnection).udpSockets()) {
    {
      const orig = s.send.bind(s) as (...args: unknown[]) => void
      ;(s as unknown as { send: (...args: unknown[]) => void }).send = (...args: unknown[]) => {
        const data = args[0]
        // 23 = DTLS record type application_data: what carries SCTP. STUN and handshakes pass.
        if (Buffer.isBuffer(data) && data[0] === 23 && random() < inj.rate) {
          inj.dropped++
          const cb = args.find((a) => typeof a === 'function') as (() => void) | undefined
          cb?.()
          return
        }
        inj.passed++
        orig(...args)
      }
    }
  }
  return inj
}

const LOSS = 0.05
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

const until = (cond: () => boolean, timeoutMs: number) => holdsWithin(cond, timeoutMs, 20)

describe('webrtc tunnel channel never retransmits (werift PR-SCTP)', function () {
  this.timeout(120_000)
  let a: WebRtcLink | undefined
  let b: WebRtcLink | undefined

  beforeEach(async () => {
    const sig = createMemorySignalingPair()
    const common = { iceAdditionalHostAddresses: ['127.0.0.1'], deadAfterMs: 30_000 }
    ;[a, b] = await Promise.all([
      createWebRtcLink({ peer: 'b', initiator: true, signaling: sig.a, ...common }),
      createWebRtcLink({ peer: 'a', initiator: false, signaling: sig.b, ...common }),
    ])
  })
  afterEach(async () => {
    await Promise.all([a?.destroy(), b?.destroy()])
  })

  it('acknowledges an in-sequence burst with one SACK per event-loop turn, not one per packet (patch)', async () => {
    const countA = injectLoss(a!, 0, () => 1)
    const countB = injectLoss(b!, 0, () => 1)
    const N = 600
    let got = 0
    b!.channel('tunnel').onMessage(() => {
      got++
    })
    const frame = new Uint8Array(1100)
    for (let i = 0; i < N; i++) {
      if (a!.channel('tunnel').bufferedAmount > 256 * 1024)
        await until(() => a!.channel('tunnel').bufferedAmount < 64 * 1024, 30_000)
      a!.channel('tunnel').send(frame)
    }
    assert.ok(await until(() => got === N, 30_000), `delivered ${got}/${N}`)
    await sleep(300) // a delayed SACK would go out by now (200 ms)
    // b sends nothing but SACKs (and a heartbeat pong or two). Stock werift acknowledges every DATA
    // packet at once (N SACKs); even SCTP's usual one per second packet would be about N/2.
    process.stdout.write(`      ${countA.passed} DATA packets acknowledged by ${countB.passed} packets\n`)
    assert.ok(countA.passed >= N)
    assert.ok(countB.passed < N / 2.5, `${countB.passed} SACK packets for ${N} DATA packets`)
  })

  for (const seed of [1, 2, 3]) {
    it(`drops tunnel messages under ${LOSS * 100}% loss and keeps every reliable message (seed ${seed})`, async () => {
      const rnd = prng(seed)
      // If anything closes under loss, say what (a bare 'channel is closed' from send() says nothing).
      const closes: string[] = []
      const why = (what: string) => (reason?: Error) => {
        closes.push(
          `${what}: ${reason?.name ?? 'no reason'} ${reason?.message ?? ''} ${String((reason?.cause as Error | undefined)?.stack ?? '')}`,
        )
      }
      a!.onClose(why('link a'))
      b!.onClose(why('link b'))
      a!.channel('tunnel').onClose(why('a tunnel'))
      a!.channel('control').onClose(why('a control'))
      const lossA = injectLoss(a!, LOSS, rnd)
      const lossB = injectLoss(b!, LOSS, rnd)
      const N = 1500
      const seen = new Set<number>()
      let dup = 0
      b!.channel('tunnel').onMessage((m) => {
        const i = new DataView(m.buffer, m.byteOffset).getUint32(0)
        if (seen.has(i)) dup++
        seen.add(i)
      })
      let reliableGot = 0
      b!.channel('control').onMessage(() => {
        reliableGot++
      })
      const frame = new Uint8Array(1000)
      for (let i = 0; i < N; i++) {
        new DataView(frame.buffer).setUint32(0, i)
        // Stay far below the high-water mark: a full unreliable channel drops at send(), which is not
        // what this test is about.
        if (a!.channel('tunnel').bufferedAmount > 256 * 1024)
          await until(() => a!.channel('tunnel').bufferedAmount < 64 * 1024, 30_000)
        assert.ok(a!.channel('tunnel').bufferedAmount + frame.byteLength <= 1024 * 1024)
        assert.deepEqual(closes, [], `closed under loss at message ${i}`)
        a!.channel('tunnel').send(frame)
        // Interleave reliable traffic: it shares the SCTP association (and its send queue).
        if (i % 15 === 0) a!.channel('control').send(frame)
        if (i % 50 === 49) await sleep(10)
      }
      const reliableSent = Math.ceil(N / 15)
      // Nothing hangs: every reliable message arrives and the tunnel's buffer drains.
      assert.ok(
        await until(() => reliableGot === reliableSent, 60_000),
        `reliable ${reliableGot}/${reliableSent}`,
      )
      assert.ok(await until(() => a!.channel('tunnel').bufferedAmount === 0, 30_000), 'tunnel buffer drained')
      await sleep(3000) // anything retransmitted would show up by now (RTO min is 1 s)
      const got = seen.size
      process.stdout.write(
        `      tunnel delivered ${got}/${N} (packets a:${lossA.passed} sent, ${lossA.dropped} dropped; b:${lossB.passed} sent, ${lossB.dropped} dropped), reliable ${reliableGot}/${reliableSent}\n`,
      )
      assert.equal(dup, 0, 'no duplicates')
      assert.ok(lossA.dropped > 0, 'the injector dropped packets')
      // A retransmitting channel would deliver all N. Not retransmitting, about LOSS of them go missing.
      assert.ok(got < N * (1 - LOSS / 3), `tunnel delivered ${got}/${N}: lost messages were retransmitted`)
      assert.ok(got > N * 0.5, `tunnel delivered only ${got}/${N}`)
      // SACKs that report gaps are coalesced per event-loop turn too (the patch; the sender counts
      // chunks acked above a hole, not SACKs, to find losses): b answers with far fewer packets.
      assert.ok(lossB.passed * 2.5 < lossA.passed, `${lossB.passed} SACK packets for ${lossA.passed} DATA`)
      // And the link still works once the loss stops.
      lossA.rate = 0
      lossB.rate = 0
      const before = seen.size
      for (let i = 0; i < 50; i++) {
        new DataView(frame.buffer).setUint32(0, N + i)
        a!.channel('tunnel').send(frame)
      }
      assert.ok(await until(() => seen.size >= before + 45, 10_000), 'tunnel delivers after the loss')
      let back = 0
      a!.channel('migrate').onMessage(() => {
        back++
      })
      b!.channel('migrate').send(new Uint8Array(10))
      assert.ok(await until(() => back === 1, 10_000), 'reliable channel alive both ways')
    })
  }
})
