/**
 * werift's SCTP flight accounting (patches/werift+0.24.4.patch), over the emulated path of
 * test/helpers/sctp-pair.ts. CI of session 6 failed on webrtc-unreliable: under 5% loss the sender's
 * flightSize stayed at 5000 with nothing in its sent queue and no T3 timer, so it never sent again and
 * the peer closed the link after 30 s of silence. Stock werift's T3 expiry marks every chunk of the sent
 * queue for retransmission, also those the peer had already acknowledged in a gap block; they are sent
 * again (into the flight) but, still flagged `acked`, never taken out of it when the cumulative ack
 * covers them. Each such chunk leaks its size into the flight for the life of the association.
 */
import assert from 'node:assert/strict'
import { sctpPair } from '../helpers/sctp-pair.ts'
import { waitUntil } from '../helpers/wait.ts'

/** SCTP common header is 12 bytes; the first chunk's type follows (0 = DATA). */
const isData = (packet: Buffer) => packet.byteLength > 12 && packet[12] === 0

describe('werift SCTP flight accounting (emulated path)', function () {
  this.timeout(30_000)

  it('a chunk acknowledged in a gap is not resent by the T3 timer, and the flight empties once all is acknowledged', async () => {
    let dropFirstData = false
    let dataPackets = 0
    const p = await sctpPair({
      oneWayMs: 5,
      drop: (packet) => {
        if (!isData(packet)) return false
        dataPackets++
        if (!dropFirstData) return false
        dropFirstData = false
        return true
      },
    })
    try {
      const got: number[] = []
      p.server.onReceive.subscribe((_s, _p, data) => {
        got.push(data.readUInt32BE(0))
      })
      dataPackets = 0
      dropFirstData = true
      // Three messages, one packet each: the first is lost, the two after it arrive and are acknowledged
      // in a gap block. Two chunks above a hole are fewer than fast retransmit needs (3), so only the
      // T3 timer (RTO, at least 1 s) recovers the first.
      for (let i = 0; i < 3; i++) {
        const msg = Buffer.alloc(1000, i)
        msg.writeUInt32BE(i, 0)
        await p.client.send(1, 53, msg, { ordered: true })
      }
      await waitUntil('all three messages delivered in order', () => got.length === 3, { timeoutMs: 15_000 })
      assert.deepEqual(got, [0, 1, 2])
      await waitUntil('the sender saw every chunk acknowledged', () => p.client.sentQueue.length === 0, {
        timeoutMs: 15_000,
      })
      // Stock werift: 2000 (the two gap-acknowledged chunks, resent and never taken out of the flight).
      assert.equal(p.client.flightSize, 0, 'nothing left in flight once everything is acknowledged')
      // The lost chunk once more, and only it: the two the peer had were not resent.
      assert.equal(dataPackets, 4, `${dataPackets} DATA packets for 3 messages with one loss`)
    } finally {
      await p.close()
    }
  })
})
