import assert from 'node:assert/strict'
import { getEventListeners } from 'node:events'
import { abortable, linkedController, onAbort, sleep } from '../../src/base/abort.ts'

const listeners = (s: AbortSignal) => getEventListeners(s, 'abort').length

describe('base/abort', () => {
  it('onAbort runs once on abort, and its disposer removes the listener', () => {
    const ac = new AbortController()
    const seen: unknown[] = []
    const off = onAbort(ac.signal, (r) => seen.push(r))
    assert.equal(listeners(ac.signal), 1)
    off()
    off()
    assert.equal(listeners(ac.signal), 0)
    ac.abort('gone')
    assert.equal(seen.length, 0)
    const ac2 = new AbortController()
    onAbort(ac2.signal, (r) => seen.push(r))
    ac2.abort('why')
    ac2.abort('again')
    assert.deepEqual(seen, ['why'])
    assert.equal(listeners(ac2.signal), 0)
  })

  it('onAbort on an aborted signal runs in a microtask (cancellable) and adds nothing', async () => {
    const seen: unknown[] = []
    const s = AbortSignal.abort('early')
    const off = onAbort(s, (r) => seen.push([r, off !== undefined]))
    onAbort(s, () => seen.push('cancelled'))()
    assert.equal(seen.length, 0)
    await Promise.resolve()
    assert.equal(listeners(s), 0)
    onAbort(undefined, () => seen.push('never'))()
    await Promise.resolve()
    assert.deepEqual(seen, [['early', true]])
  })

  it('a thousand finished operations leave no listener on a long-lived signal', async () => {
    const life = new AbortController()
    for (let i = 0; i < 1000; i++) {
      await abortable(Promise.resolve(i), life.signal)
      await assert.rejects(abortable(Promise.reject(new Error('x')), life.signal), /x/)
      const child = linkedController(life.signal)
      child.detach()
      const child2 = linkedController(life.signal)
      child2.controller.abort()
    }
    await sleep(1, life.signal)
    assert.equal(listeners(life.signal), 0)
  })

  it('linkedController follows its parent with the parent reason', () => {
    const parent = new AbortController()
    const child = linkedController(parent.signal)
    parent.abort('stop')
    assert.equal(child.signal.aborted, true)
    assert.equal(child.signal.reason, 'stop')
    const late = linkedController(parent.signal)
    assert.equal(late.signal.aborted, true)
  })

  it('abortable and sleep reject with AbortError keeping the reason', async () => {
    const ac = new AbortController()
    const never = new Promise<never>(() => {})
    const p = abortable(never, ac.signal)
    const s = sleep(60_000, ac.signal)
    ac.abort('bye')
    await assert.rejects(p, (e: Error) => e.name === 'AbortError' && e.cause === 'bye')
    await assert.rejects(s, (e: Error) => e.name === 'AbortError' && e.cause === 'bye')
    await assert.rejects(sleep(10, AbortSignal.abort('pre')), { name: 'AbortError' })
    assert.equal(listeners(ac.signal), 0)
  })
})
