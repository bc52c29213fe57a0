/**
 * The one WebRTC link's own logic (heartbeat, dead timer, bye, cleanup) over an in-memory engine: the
 * places where the werift and libdatachannel links had drifted apart before they became one.
 */
import assert from 'node:assert/strict'
import { LinkDeadError } from '../../net/webrtc/errors.ts'
import { ANSWERER_PING_EVERY, LINK_CHANNEL_SPECS, WebRtcLink } from '../../net/webrtc/link.ts'
import { decodeHeartbeat, encodeHeartbeat } from '../../net/webrtc/v1/heartbeat.ts'
import { type FakeConnection, fakeConnectionPair } from '../helpers/fake-engine.ts'
import { waitUntil } from '../helpers/wait.ts'

const HB = LINK_CHANNEL_SPECS.findIndex((s) => s.label === 'heartbeat')

function pair(opts: { heartbeatMs?: number; deadAfterMs?: number; roles?: boolean } = {}) {
  const [ca, cb] = fakeConnectionPair(LINK_CHANNEL_SPECS)
  const o = {
    heartbeatMs: opts.heartbeatMs ?? 20,
    deadAfterMs: opts.deadAfterMs ?? 10_000,
    highWaterMark: 1 << 20,
    lowWaterMark: 1 << 18,
  }
  // roles: a created the offer, b answered (as createWebRtcLink says); else both ping every heartbeat.
  const a = new WebRtcLink('peer-b', 's', ca, opts.roles ? { ...o, initiator: true } : o)
  const b = new WebRtcLink('peer-a', 's', cb, opts.roles ? { ...o, initiator: false } : o)
  return { a, b, ca, cb }
}

const until = (cond: () => boolean, timeoutMs = 5000) =>
  waitUntil(cond.toString(), cond, { timeoutMs, intervalMs: 5 })

const heartbeatsSent = (c: FakeConnection) =>
  c.channels[HB]!.sent.map((m) => decodeHeartbeat(m as Uint8Array))

describe('webrtc link over an engine adapter (in-memory engine)', () => {
  it('pings, answers pongs and measures the RTT on both ends', async () => {
    const { a, b } = pair()
    try {
      await until(() => a.rttMs !== undefined && b.rttMs !== undefined)
      assert.equal(a.engine, 'werift')
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })

  it('one ping round per heartbeat: the initiator pings each, the answerer answers and pings every ANSWERER_PING_EVERY for its RTT', async () => {
    const heartbeatMs = 20
    const { a, b, cb } = pair({ heartbeatMs, roles: true })
    // When the answering end sent each heartbeat (the link sends synchronously from its tick).
    const answerer: { kind: string; seq: number; at: number }[] = []
    const hb = cb.channels[HB]!
    const send = hb.send.bind(hb)
    hb.send = (data) => {
      const h = decodeHeartbeat(data as Uint8Array)
      answerer.push({ ...h, at: performance.now() })
      send(data)
    }
    try {
      const rounds = 3 * ANSWERER_PING_EVERY
      const pongs = () => answerer.filter((h) => h.kind === 'pong')
      // ~0.3 s unloaded; the bound is only there to end a broken run before mocha's 10 s.
      await until(() => pongs().length >= rounds && a.rttMs !== undefined && b.rttMs !== undefined, 9000)
      const initiatorPings = heartbeatsSent(a.connection as FakeConnection).filter((h) => h.kind === 'ping')
      // Every ping the initiator sent was answered, in order (a few may still be in flight).
      assert.deepEqual(
        pongs().map((h) => h.seq),
        initiatorPings.slice(0, pongs().length).map((h) => h.seq),
      )
      // The answerer's own pings are at least ANSWERER_PING_EVERY heartbeats apart (a lower bound: load
      // only makes them further apart; before, they were one heartbeat apart).
      const own = answerer.filter((h) => h.kind === 'ping')
      assert.ok(own.length >= 1, 'the answerer measures its RTT too')
      for (let i = 1; i < own.length; i++)
        assert.ok(
          own[i]!.at - own[i - 1]!.at >= ANSWERER_PING_EVERY * heartbeatMs - 1,
          `answerer pings ${(own[i]!.at - own[i - 1]!.at).toFixed(1)} ms apart`,
        )
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })

  it('close says bye; the peer closes with LinkClosedByPeerError and says nothing back', async () => {
    const { a, b, ca, cb } = pair({ heartbeatMs: 10_000 })
    let reason: Error | undefined
    b.onClose((r) => {
      reason = r
    })
    a.close()
    await until(() => b.state === 'closed')
    assert.equal(reason?.name, 'LinkClosedByPeerError')
    assert.deepEqual(
      heartbeatsSent(ca).map((h) => h.kind),
      ['bye'],
    )
    assert.deepEqual(heartbeatsSent(cb), [], 'a link closed by its peer sends no bye back')
    await Promise.all([a.closed, b.closed])
    assert.equal(ca.closedCalls, 1)
    assert.equal(cb.closedCalls, 1)
  })

  it('ignores heartbeats that arrive after it closed (no pong from a closed link)', async () => {
    const { a, b, ca, cb } = pair({ heartbeatMs: 10_000 })
    a.close(new LinkDeadError('test'))
    const before = ca.channels[HB]!.sent.length
    // A ping that was in flight reaches the closed end (the engine still delivers it).
    cb.channels[HB]!.send(encodeHeartbeat({ kind: 'ping', seq: 7 }))
    ca.channels[HB]!.deliver(encodeHeartbeat({ kind: 'ping', seq: 8 }))
    await new Promise((r) => setImmediate(r))
    assert.equal(ca.channels[HB]!.sent.length, before, 'nothing sent after close')
    await Promise.all([a.destroy(), b.destroy()])
  })

  it('a failed connection closes the link with LinkDeadError, and the link stops watching it', async () => {
    const { a, b, ca } = pair()
    assert.equal(ca.stateSubscribers, 1)
    let reason: Error | undefined
    a.onClose((r) => {
      reason = r
    })
    ca.stateListeners.emit('failed')
    assert.equal(a.state, 'closed')
    assert.equal(reason?.name, 'LinkDeadError')
    assert.match(reason?.message ?? '', /connection failed/)
    assert.equal(ca.stateSubscribers, 0, 'state watcher removed on close')
    await Promise.all([a.destroy(), b.destroy()])
  })

  it('every close path removes the state watcher and releases every channel', async () => {
    const { a, b, ca, cb } = pair()
    a.close()
    await until(() => b.state === 'closed')
    for (const c of [ca, cb]) {
      assert.equal(c.stateSubscribers, 0)
      assert.ok(
        c.channels.every((ch) => ch.released),
        'channels released',
      )
    }
    await Promise.all([a.closed, b.closed])
  })

  it('a peer that goes silent is closed with LinkDeadError after deadAfterMs', async () => {
    const { a, b, cb } = pair({ heartbeatMs: 20, deadAfterMs: 200 })
    // b's engine stops delivering anything to a (a dead path), without telling either end.
    for (const ch of cb.channels) ch.peer = undefined
    let reason: Error | undefined
    a.onClose((r) => {
      reason = r
    })
    const t0 = Date.now()
    await until(() => a.state === 'closed', 3000)
    assert.equal(reason?.name, 'LinkDeadError')
    assert.match(reason?.message ?? '', /nothing heard/)
    assert.ok(Date.now() - t0 >= 150, 'not before the dead interval')
    await Promise.all([a.destroy(), b.destroy()])
  })

  it('a heartbeat that does not decode counts as life and changes nothing else', async () => {
    const { a, b, ca } = pair({ heartbeatMs: 10_000, deadAfterMs: 10_000 })
    try {
      const before = ca.channels[HB]!.sent.length
      for (const junk of [new Uint8Array(0), new Uint8Array([9, 0, 0, 0, 0]), new Uint8Array(100), 'text'])
        ca.channels[HB]!.deliver(junk)
      assert.equal(a.state, 'open')
      assert.equal(ca.channels[HB]!.sent.length, before)
      assert.ok(a.silentMs < 1000)
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })

  it('an engine send failure closes that channel with ChannelClosedError (cause kept)', async () => {
    const { a, b, ca } = pair()
    try {
      const control = ca.channels[0]!
      control.isOpen = false
      assert.throws(
        () => a.channel('control').send(new Uint8Array(3)),
        (err: Error) =>
          err.name === 'ChannelClosedError' && (err.cause as Error).message === 'fake channel closed',
      )
      assert.equal(a.channel('control').state, 'closed')
    } finally {
      await Promise.all([a.destroy(), b.destroy()])
    }
  })
})
