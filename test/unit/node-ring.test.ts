import assert from 'node:assert/strict'
import fc from 'fast-check'
import { ringNeighbours } from '../../net/node/ring.ts'

describe('warm set (ring neighbours by PeerId)', () => {
  it('is the whole mesh up to k + 1 members, k neighbours beyond', () => {
    const ids = ['a', 'b', 'c', 'd', 'e']
    assert.deepEqual([...ringNeighbours(ids, 'c', 8)].sort(), ['a', 'b', 'd', 'e'])
    assert.deepEqual([...ringNeighbours(ids, 'c', 4)].sort(), ['a', 'b', 'd', 'e'])
    assert.deepEqual([...ringNeighbours(ids, 'a', 2)].sort(), ['b', 'e'])
    assert.equal(ringNeighbours(ids, 'zz', 2).size, 0)
    assert.equal(ringNeighbours(ids, 'a', 0).size, 0)
  })

  it('is symmetric, bounded by k, and connects every member (both ends agree who keeps a link)', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.string({ minLength: 4, maxLength: 8 }), { minLength: 2, maxLength: 80 }),
        fc.integer({ min: 1, max: 12 }),
        (raw, k) => {
          const ids = [...raw].sort()
          const sets = new Map(ids.map((id) => [id, ringNeighbours(ids, id, k)]))
          for (const [a, s] of sets) {
            assert.ok(s.size <= Math.max(k + 1, 2) && !s.has(a))
            for (const b of s) assert.ok(sets.get(b)!.has(a), `${b} keeps ${a}`)
          }
          // connected: a walk from the first member reaches all
          const seen = new Set([ids[0]!])
          const todo = [ids[0]!]
          while (todo.length > 0)
            for (const b of sets.get(todo.pop()!)!) if (!seen.has(b)) seen.add(b) && todo.push(b)
          assert.equal(seen.size, ids.length)
        },
      ),
      { numRuns: 300 },
    )
  })
})
