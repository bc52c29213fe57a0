import assert from 'node:assert/strict'
import fc from 'fast-check'
import { createDiag } from '../../net/diag/diag.ts'
import { DiagDecodeError, decodeDiag } from '../../net/diag/v1/messages.ts'
import { createMemoryNetwork } from '../../net/link/memory.ts'

describe('link diagnostics (ping, bench)', () => {
  it('pings and benches over a memory link, counting every byte', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b', { highWaterMark: 256 * 1024 })
    const a = createDiag(net.node('a'))
    const b = createDiag(net.node('b'))
    try {
      const rtt = await a.ping('b')
      assert.ok(rtt >= 0 && rtt < 1000)
      const r = await a.bench('b', 8 * 1024 * 1024 + 5)
      assert.equal(r.bytes, 8 * 1024 * 1024 + 5)
      assert.ok(r.mbps > 0)
    } finally {
      a.stop()
      b.stop()
    }
  })

  it('names a missing link and times out a silent peer', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = createDiag(net.node('a'))
    try {
      await assert.rejects(
        a.ping('zz'),
        (e: Error) => e.name === 'DiagError' && /no open link/.test(e.message),
      )
      await assert.rejects(a.ping('b', { timeoutMs: 100 }), (e: Error) => e.name === 'DiagError')
    } finally {
      a.stop()
    }
  })

  it('a ping with no link leaves nothing behind to reject later (an unhandled rejection ends the agent)', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = createDiag(net.node('a'))
    const unhandled: unknown[] = []
    const onUnhandled = (reason: unknown) => unhandled.push(reason)
    process.on('unhandledRejection', onUnhandled)
    try {
      await assert.rejects(a.ping('zz', { timeoutMs: 30 }), (e: Error) => /no open link/.test(e.message))
      await new Promise((r) => setTimeout(r, 120)) // deliberate: 4× the injected 30 ms timeout, nothing may surface
      assert.deepEqual(unhandled, [])
    } finally {
      process.off('unhandledRejection', onUnhandled)
      a.stop()
    }
  })

  it('the decoder only throws DiagDecodeError on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        try {
          decodeDiag(bytes)
        } catch (e) {
          if (!(e instanceof DiagDecodeError)) throw e
        }
      }),
      { numRuns: 3000 },
    )
  })
})
