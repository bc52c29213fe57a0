/**
 * The libdatachannel engine (net/webrtc/ndc) against the Link contract, plus its own specifics:
 * heartbeat RTT, dead-peer detection, connect timeout and abort. Two links in this process over the
 * host's interfaces, signaling in memory.
 */
import assert from 'node:assert/strict'
import { parseLinkEngine } from '../../net/webrtc/engines.ts'
import {
  createWebRtcLink,
  linkFactoryFor,
  type WebRtcLink,
  type WebRtcLinkOptions,
} from '../../net/webrtc/link.ts'
import { createMemorySignalingPair } from '../../net/webrtc/memory-signaling.ts'
import { toNdcIceServers } from '../../net/webrtc/ndc/engine.ts'

type NdcLink = WebRtcLink
const createNdcLink = (o: WebRtcLinkOptions) => createWebRtcLink({ ...o, engine: 'libdatachannel' })

import { runLinkCompliance } from '../helpers/link-compliance.ts'
import { holdsWithin, waitUntil } from '../helpers/wait.ts'

async function ndcPair(extra: { deadAfterMs?: number } = {}): Promise<{ a: NdcLink; b: NdcLink }> {
  const sig = createMemorySignalingPair()
  const [a, b] = await Promise.all([
    createNdcLink({ peer: 'peer-b', initiator: true, signaling: sig.a, ...extra }),
    createNdcLink({ peer: 'peer-a', initiator: false, signaling: sig.b, ...extra }),
  ])
  return { a, b }
}

runLinkCompliance(
  'webrtc (libdatachannel, in-process)',
  async () => {
    const { a, b } = await ndcPair()
    return {
      a,
      b,
      async cleanup() {
        await Promise.all([a.destroy(), b.destroy()])
      },
    }
  },
  { bulkBytes: 32 * 1024 * 1024, timeoutMs: 120_000 },
)

describe('webrtc link (libdatachannel) specifics', function () {
  this.timeout(60_000)

  it('measures RTT and setup time and reports a host path', async () => {
    const { a, b } = await ndcPair()
    try {
      assert.equal(a.engine, 'libdatachannel')
      // The first pong measures it (not 1.5 s tied to the default heartbeat).
      await waitUntil('a pong on each end', () => a.rttMs !== undefined && b.rttMs !== undefined)
      assert.ok(a.rttMs !== undefined && a.rttMs >= 0 && a.rttMs < 1000, `rtt ${a.rttMs}`)
      assert.ok(b.rttMs !== undefined, 'both ends ping')
      assert.ok(a.setupMs > 0 && a.setupMs < 30_000)
      assert.ok(['host', 'prflx'].includes(a.path.type), a.path.type)
      assert.match(a.path.local ?? '', /:\d+$/)
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })

  it('a link whose peer goes silent closes with LinkDeadError', async () => {
    const { a, b } = await ndcPair({ deadAfterMs: 2000 })
    try {
      let reason: Error | undefined
      a.onClose((r) => {
        reason = r
      })
      // b stays connected but stops its heartbeat and stops answering pings: a hears nothing.
      const inner = b as unknown as { heartbeatTimer: NodeJS.Timeout; onHeartbeat: () => void }
      clearInterval(inner.heartbeatTimer)
      inner.onHeartbeat = () => {}
      const t0 = Date.now()
      await holdsWithin(() => a.state === 'closed', 10_000, 50)
      assert.equal(a.state, 'closed')
      assert.equal(reason?.name, 'LinkDeadError')
      assert.match(reason?.message ?? '', /nothing heard/)
      assert.ok(Date.now() - t0 < 5000, 'noticed within 5 s')
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })

  it('a peer that closes is noticed with LinkClosedByPeerError', async () => {
    const { a, b } = await ndcPair()
    let reason: Error | undefined
    b.onClose((r) => {
      reason = r
    })
    await a.destroy()
    await holdsWithin(() => b.state === 'closed', 5000)
    await b.destroy()
    assert.equal(reason?.name, 'LinkClosedByPeerError')
  })

  it('connect gives up with LinkConnectError when the peer never answers', async () => {
    const sig = createMemorySignalingPair()
    const t0 = Date.now()
    await assert.rejects(
      createNdcLink({ peer: 'nobody', initiator: true, signaling: sig.a, connectTimeoutMs: 1500 }),
      { name: 'LinkConnectError' },
    )
    assert.ok(Date.now() - t0 < 5000)
  })

  it('connect is abortable, and a bye from the peer refuses it', async () => {
    const sig = createMemorySignalingPair()
    const ac = new AbortController()
    setTimeout(() => ac.abort(), 200)
    await assert.rejects(
      createNdcLink({ peer: 'nobody', initiator: false, signaling: sig.b, signal: ac.signal }),
      { name: 'AbortError' },
    )
    const sig2 = createMemorySignalingPair()
    sig2.b.onMessage((m) => {
      if (m.type === 'offer') sig2.b.send({ v: 1, session: m.session, type: 'bye', reason: 'no thanks' })
    })
    await assert.rejects(createNdcLink({ peer: 'p', initiator: true, signaling: sig2.a }), {
      name: 'LinkConnectError',
      message: /no thanks/,
    })
  })

  it('translates W3C ICE server URLs for libdatachannel', () => {
    assert.deepEqual(
      toNdcIceServers([
        { urls: 'stun:198.51.100.1:3478' },
        {
          urls: ['turn:198.51.100.2?transport=tcp', 'turn:198.51.100.2:3479'],
          username: 'u',
          credential: 'p',
        },
        { urls: 'bogus' },
      ]),
      [
        'stun:198.51.100.1:3478',
        { hostname: '198.51.100.2', port: 3478, username: 'u', password: 'p', relayType: 'TurnTcp' },
        { hostname: '198.51.100.2', port: 3479, username: 'u', password: 'p', relayType: 'TurnUdp' },
      ],
    )
  })

  it('linkFactoryFor builds links of either engine that talk to each other', async () => {
    assert.equal(parseLinkEngine('libdatachannel'), 'libdatachannel')
    assert.throws(() => parseLinkEngine('pion'), { name: 'UsageError' })
    const sig = createMemorySignalingPair()
    const ac = new AbortController()
    const common = { iceServers: [], signal: ac.signal }
    const [a, b] = await Promise.all([
      linkFactoryFor('werift', { iceAdditionalHostAddresses: ['127.0.0.1'] })({
        peer: 'b',
        initiator: true,
        signaling: sig.a,
        ...common,
      }),
      linkFactoryFor('libdatachannel')({ peer: 'a', initiator: false, signaling: sig.b, ...common }),
    ])
    try {
      assert.equal((b as NdcLink).engine, 'libdatachannel')
      const got: number[] = []
      b.channel('control').onMessage((m) => got.push(m.byteLength))
      a.channel('control').send(new Uint8Array(1234))
      await holdsWithin(() => got.length >= 1, 10_000)
      assert.deepEqual(got, [1234])
    } finally {
      // The factory's signal bounds the links' life.
      ac.abort()
      await holdsWithin(() => a.state === 'closed' && b.state === 'closed', 10_000)
      assert.equal(a.state, 'closed')
      assert.equal(b.state, 'closed')
      await (b as NdcLink).closed
    }
  })
})
