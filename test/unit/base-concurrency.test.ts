import assert from 'node:assert/strict'
import { forEachLimit } from '../../src/base/concurrency.ts'

describe('forEachLimit (src/base/concurrency.ts)', () => {
  const tick = () => new Promise((r) => setImmediate(r))

  it('takes every item once, in order, with at most `limit` in flight', async () => {
    let inFlight = 0
    let most = 0
    const started: number[] = []
    await forEachLimit([...Array(20).keys()], 3, async (i) => {
      started.push(i)
      most = Math.max(most, ++inFlight)
      await tick()
      inFlight--
    })
    assert.deepEqual(started, [...Array(20).keys()])
    assert.equal(most, 3)
  })

  it('stop() ends it before the next item is taken', async () => {
    const seen: number[] = []
    await forEachLimit(
      [1, 2, 3, 4, 5],
      1,
      async (i) => {
        seen.push(i)
      },
      () => seen.length === 2,
    )
    assert.deepEqual(seen, [1, 2])
  })

  it('rejects with the first error and starts nothing after it', async () => {
    const seen: number[] = []
    await assert.rejects(
      forEachLimit([1, 2, 3, 4, 5, 6], 2, async (i) => {
        seen.push(i)
        await tick()
        if (i === 2) throw new Error('boom')
      }),
      /boom/,
    )
    await tick()
    await tick()
    assert.ok(seen.length <= 3, `started ${seen}`)
  })

  it('an empty list resolves at once', async () => {
    await forEachLimit([], 4, async () => assert.fail('called'))
  })
})
