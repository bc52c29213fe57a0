import assert from 'node:assert/strict'
import { createWebRtcLink, type WebRtcLink } from '../../net/webrtc/link.ts'
import { createMemorySignalingPair } from '../../net/webrtc/memory-signaling.ts'
import { runLinkCompliance } from '../helpers/link-compliance.ts'
import { holdsWithin, waitUntil } from '../helpers/wait.ts'

/** Two werift links in this process over loopback, signaling in memory. */
async function loopbackPair(extra: { deadAfterMs?: number } = {}): Promise<{ a: WebRtcLink; b: WebRtcLink }> {
  const sig = createMemorySignalingPair()
  const common = { iceAdditionalHostAddresses: ['127.0.0.1'], ...extra }
  const [a, b] = await Promise.all([
    createWebRtcLink({ peer: 'peer-b', initiator: true, signaling: sig.a, ...common }),
    createWebRtcLink({ peer: 'peer-a', initiator: false, signaling: sig.b, ...common }),
  ])
  return { a, b }
}

function udpAndTimers(): { udp: number; timers: number } {
  const r = process.getActiveResourcesInfo()
  return { udp: r.filter((x) => x === 'UDPWrap').length, timers: r.filter((x) => x === 'Timeout').length }
}

runLinkCompliance(
  'webrtc (werift, loopback)',
  async () => {
    const { a, b } = await loopbackPair()
    return {
      a,
      b,
      async cleanup() {
        await Promise.all([a.destroy(), b.destroy()])
      },
    }
  },
  { bulkBytes: 8 * 1024 * 1024, timeoutMs: 120_000 },
)

describe('webrtc link (werift) specifics', function () {
  this.timeout(60_000)

  it('releases every UDP socket and timer after close', async () => {
    const before = udpAndTimers()
    const { a, b } = await loopbackPair()
    assert.ok(udpAndTimers().udp > before.udp, 'sockets were opened')
    a.channel('control').send(new Uint8Array(1000))
    await Promise.all([a.destroy(), b.destroy()])
    // werift clears some timers a moment after close: allow a short settle time.
    await holdsWithin(
      () => {
        const now = udpAndTimers()
        return now.udp === before.udp && now.timers <= before.timers
      },
      5000,
      50,
    )
    assert.deepEqual(udpAndTimers().udp, before.udp, 'no leaked UDP sockets')
    assert.ok(udpAndTimers().timers <= before.timers, `no leaked timers (${JSON.stringify(udpAndTimers())})`)
  })

  it('measures RTT and setup time', async () => {
    const { a, b } = await loopbackPair()
    try {
      // The first pong measures it (not 1.5 s tied to the default heartbeat).
      await waitUntil('a pong on each end', () => a.rttMs !== undefined && b.rttMs !== undefined)
      assert.ok(a.rttMs !== undefined && a.rttMs >= 0 && a.rttMs < 1000, `rtt ${a.rttMs}`)
      assert.ok(a.setupMs > 0 && a.setupMs < 30_000)
      assert.ok(['host', 'prflx'].includes(a.path.type), a.path.type)
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })

  it('a link whose peer goes silent closes with LinkDeadError', async () => {
    const { a, b } = await loopbackPair({ deadAfterMs: 2000 })
    try {
      let reason: Error | undefined
      a.onClose((r) => {
        reason = r
      })
      // Simulate a dead path: b stops answering without saying bye (its pc vanishes abruptly).
      void b.connection.close()
      await holdsWithin(() => a.state === 'closed', 10_000, 50)
      assert.equal(a.state, 'closed')
      assert.equal(reason?.name, 'LinkDeadError')
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })

  it('connect gives up with LinkConnectError when the peer never answers, leaving nothing open', async () => {
    const before = udpAndTimers()
    const sig = createMemorySignalingPair()
    await assert.rejects(
      createWebRtcLink({ peer: 'nobody', initiator: true, signaling: sig.a, connectTimeoutMs: 1500 }),
      { name: 'LinkConnectError' },
    )
    // The sockets close as the attempt unwinds: wait for that (bounded), then check.
    await holdsWithin(() => udpAndTimers().udp === before.udp, 5000)
    assert.equal(udpAndTimers().udp, before.udp)
  })

  it('connect is abortable', async () => {
    const sig = createMemorySignalingPair()
    const ac = new AbortController()
    setTimeout(() => ac.abort(), 200)
    await assert.rejects(
      createWebRtcLink({ peer: 'nobody', initiator: false, signaling: sig.b, signal: ac.signal }),
      { name: 'AbortError' },
    )
  })
})
