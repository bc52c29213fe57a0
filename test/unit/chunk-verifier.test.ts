import { strict as assert } from 'node:assert'
import { randomBytes } from 'node:crypto'
import { HASH_SIZE, sha256 } from '../../net/chunks/hash.ts'
import { createBlockVerifier, inlineVerifier, type VerifyItem } from '../../net/chunks/verifier.ts'

function blocks(n: number, size: number): VerifyItem[] {
  return Array.from({ length: n }, () => {
    const data = randomBytes(size)
    return { hash: sha256(data), data }
  })
}

/** Blocks laid out in one message buffer the caller owns, [hash | data]…, as a received BLOCKS message. */
function message(n: number, size: number): { owner: Uint8Array; items: VerifyItem[]; copies: Buffer[] } {
  const owner = new Uint8Array((HASH_SIZE + size) * n)
  const items: VerifyItem[] = []
  const copies: Buffer[] = []
  for (let i = 0; i < n; i++) {
    const at = i * (HASH_SIZE + size)
    const data = randomBytes(size)
    owner.set(sha256(data), at)
    owner.set(data, at + HASH_SIZE)
    items.push({
      hash: owner.subarray(at, at + HASH_SIZE),
      data: owner.subarray(at + HASH_SIZE, at + HASH_SIZE + size),
    })
    copies.push(data)
  }
  return { owner, items, copies }
}

describe('chunk verifier: received blocks hashed against their names off the main thread', () => {
  for (const [name, make] of [
    ['worker', () => createBlockVerifier({ threads: 2 })],
    ['inline', () => inlineVerifier],
  ] as const) {
    it(`${name}: good blocks pass, a forged or truncated one is caught, the bytes come back intact`, async () => {
      const v = make()
      try {
        const good = blocks(3, 64 * 1024)
        const copies = good.map((b) => Buffer.from(b.data))
        const r = await v.verify(good)
        assert.deepEqual(r.ok, [true, true, true])
        // Not owned by the call: copied to the worker, the caller's views still hold the bytes.
        for (const [i, b] of good.entries()) {
          assert.ok(Buffer.from(b.data).equals(copies[i]!))
          assert.ok(Buffer.from(r.data[i]!).equals(copies[i]!))
        }
        const forged = blocks(3, 64 * 1024)
        forged[1]!.data[100]! ^= 1
        const short = blocks(2, 64 * 1024)
        short[0] = { hash: short[0]!.hash, data: short[0]!.data.subarray(1) }
        const [a, b] = await Promise.all([v.verify(forged), v.verify(short)])
        assert.deepEqual(a.ok, [true, false, true])
        assert.deepEqual(b.ok, [false, true])
        // Small calls (hashed inline) and many calls at once (pooled buffers reused) agree.
        assert.deepEqual((await v.verify(blocks(1, 1000))).ok, [true])
        const many = Array.from({ length: 40 }, () => blocks(3, 64 * 1024))
        many[17]![2]!.hash = sha256(Buffer.from('other'))
        const out = await Promise.all(many.map((m) => v.verify(m)))
        for (const [i, o] of out.entries())
          assert.deepEqual(o.ok, i === 17 ? [true, true, false] : [true, true, true])
      } finally {
        v.close()
      }
    })

    it(`${name}: a message buffer the caller owns may travel and comes back as the same bytes`, async () => {
      const v = make()
      try {
        const msgs = Array.from({ length: 12 }, () => message(3, 64 * 1024))
        msgs[5]!.owner[HASH_SIZE + 64 * 1024 + HASH_SIZE + 7]! ^= 1 // block 1's data of message 5
        const out = await Promise.all(msgs.map((m) => v.verify(m.items, m.owner)))
        // The worker took the buffers (no copy): the caller's old views are detached meanwhile.
        if (name === 'worker') assert.equal(msgs[0]!.owner.byteLength, 0)
        for (const [i, o] of out.entries()) {
          assert.deepEqual(o.ok, i === 5 ? [true, false, true] : [true, true, true])
          if (i === 5) continue
          for (const [j, d] of o.data.entries()) assert.ok(Buffer.from(d).equals(msgs[i]!.copies[j]!))
        }
      } finally {
        v.close()
      }
    })
  }

  it('after close() it still answers (inline), so a stopping service never leaves a block unchecked', async () => {
    const v = createBlockVerifier({ threads: 1 })
    const pending = v.verify(blocks(3, 64 * 1024))
    v.close()
    assert.deepEqual((await pending).ok, [true, true, true])
    const bad = blocks(2, 64 * 1024)
    bad[0]!.data[0]! ^= 1
    assert.deepEqual((await v.verify(bad)).ok, [false, true])
  })
})
