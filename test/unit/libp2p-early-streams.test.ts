import assert from 'node:assert/strict'
import '../../net/polyfill.ts'
import type { Stream, StreamMuxer } from '@libp2p/interface'
import { multiaddrConnectionPair } from '@libp2p/utils'
import { controlMuxer } from '../../net/node/libp2p.ts'
import { waitUntil } from '../helpers/wait.ts'

/**
 * A member that reaches a loaded bootstrap late opens many streams at once on the new connection (a
 * relayed dial per waiting link attempt, member sync, reservation) before the bootstrap has wired the
 * connection up. yamux's default (10 such early streams) aborted the whole connection then, again at
 * every reconnect: the 50-agent join's slowest member was cut off so for ~100 s.
 */
describe('control plane muxer: early streams', () => {
  it('keeps a connection whose remote opens 64 streams before anything listens, and hands them over', async () => {
    const [outbound, inbound] = multiaddrConnectionPair()
    const client: StreamMuxer = controlMuxer()().createStreamMuxer(outbound)
    const server: StreamMuxer = controlMuxer()().createStreamMuxer(inbound)
    try {
      const opened: Stream[] = []
      for (let i = 0; i < 64; i++) {
        const s = await client.createStream()
        s.send(new Uint8Array([i]))
        opened.push(s)
      }
      // No 'stream' listener yet on the server: each of these is an early stream.
      await waitUntil(
        'the server sees 64 streams, or gives up',
        () => server.streams.length >= 64 || server.status !== 'open',
        {
          timeoutMs: 30_000,
          intervalMs: 10,
        },
      )
      assert.equal(server.status, 'open', 'the muxer was not aborted')
      const got: Stream[] = []
      server.addEventListener('stream', (e) => got.push(e.detail))
      await waitUntil('64 early streams handed over', () => got.length === 64, {
        timeoutMs: 30_000,
        intervalMs: 10,
      })
      assert.equal(client.status, 'open')
    } finally {
      client.abort(new Error('test over'))
      server.abort(new Error('test over'))
    }
  })
})
