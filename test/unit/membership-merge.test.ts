import assert from 'node:assert/strict'
import { generateKeyPair } from '@libp2p/crypto/keys'
import type { PrivateKey } from '@libp2p/interface'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import fc from 'fast-check'
import type { SignedRecord } from '../../net/membership/interfaces.ts'
import { createInvite } from '../../net/membership/invite.ts'
import { MemberSet, signEntry, signRevocation, verifyRecord } from '../../net/membership/member-set.ts'
import { createNetwork, type NetworkKey } from '../../net/membership/network.ts'

interface Node {
  key: PrivateKey
  id: string
}

describe('member set', function () {
  this.timeout(60_000)
  let net: NetworkKey
  const nodes: Node[] = []
  /** A pool of valid records: admissions (including two peers racing for one nonce), re-joins and
   *  revocations. Merges of any subsets in any order must converge. */
  const pool: SignedRecord[] = []

  before(async () => {
    net = await createNetwork('gamma')
    for (let i = 0; i < 6; i++) {
      const key = await generateKeyPair('Ed25519')
      nodes.push({ key, id: peerIdFromPrivateKey(key).toString() })
    }
    const [n0, n1, n2, n3, n4, n5] = nodes as [Node, Node, Node, Node, Node, Node]
    const now = Date.now()
    const inv = async (bound?: string) =>
      (await createInvite(net, { bootstrap: [], ttlMs: 3_600_000, ...(bound ? { boundPeer: bound } : {}) }))
        .encoded
    const add = async (by: Node, who: Node, invite: string, name: string, at = now) =>
      signEntry(by.key, { peerId: who.id, name, invite, addedBy: by.id, addedAt: at })
    pool.push(await add(n0, n0, await inv(n0.id), 'n0'))
    pool.push(await add(n0, n1, await inv(), 'n1'))
    pool.push(await add(n1, n2, await inv(n2.id), 'n2'))
    const shared = await inv()
    pool.push(await add(n0, n3, shared, 'n3'))
    pool.push(await add(n1, n4, shared, 'n4')) // the same nonce used twice, at two members
    pool.push(await add(n0, n5, await inv(), 'n5'))
    pool.push(await add(n2, n5, await inv(), 'n5-renamed', now + 5)) // re-join: the later entry names it
    pool.push(await signRevocation(net, n2.id))
  })

  it('derives members: revocation wins, a nonce admits one peer, the latest entry names a peer', async () => {
    const set = new MemberSet(net.info)
    const { added, invalid } = await set.merge(pool)
    assert.equal(invalid, 0)
    assert.equal(added, pool.length)
    const [n0, n1, n2, n3, n4, n5] = nodes as [Node, Node, Node, Node, Node, Node]
    assert.ok(set.isMember(n0.id) && set.isMember(n1.id) && set.isMember(n5.id))
    assert.ok(!set.isMember(n2.id) && set.isRevoked(n2.id))
    const winner = n3.id < n4.id ? n3 : n4
    const loser = winner === n3 ? n4 : n3
    assert.ok(set.isMember(winner.id) && !set.isMember(loser.id))
    assert.equal(set.member(n5.id)?.name, 'n5-renamed')
  })

  it('merge converges whatever the order and grouping (fast-check)', async () => {
    const reference = new MemberSet(net.info)
    await reference.merge(pool)
    const want = JSON.stringify(reference.members())
    await fc.assert(
      fc.asyncProperty(
        // three replicas, each getting a random subsequence of the pool (with repeats) in random order,
        // then a random sequence of pairwise full exchanges that ends with everyone exchanging
        fc.array(fc.array(fc.nat({ max: pool.length - 1 }), { maxLength: 12 }), {
          minLength: 3,
          maxLength: 3,
        }),
        fc.array(fc.tuple(fc.nat({ max: 2 }), fc.nat({ max: 2 })), { maxLength: 6 }),
        async (initial, exchanges) => {
          const replicas = [0, 1, 2].map(() => new MemberSet(net.info))
          for (let r = 0; r < 3; r++) for (const i of initial[r]!) await replicas[r]!.merge([pool[i]])
          // everything ends up somewhere
          await replicas[0]!.merge(pool)
          for (const [x, y] of [...exchanges, [0, 1], [1, 2], [2, 0], [0, 1]] as [number, number][]) {
            const a = replicas[x]!
            const b = replicas[y]!
            const fromA = a.list()
            await a.merge(b.list())
            await b.merge(fromA)
          }
          for (const r of replicas) {
            assert.equal(JSON.stringify(r.members()), want)
            assert.equal(r.digest(), reference.digest())
          }
        },
      ),
      { numRuns: 40 },
    )
  })

  it('merge is idempotent and commutative for any two subsets', async () => {
    await fc.assert(
      fc.asyncProperty(fc.subarray(pool), fc.subarray(pool), async (x, y) => {
        const ab = new MemberSet(net.info)
        await ab.merge(x)
        await ab.merge(y)
        await ab.merge(x)
        const ba = new MemberSet(net.info)
        await ba.merge(y)
        await ba.merge(x)
        assert.equal(ab.digest(), ba.digest())
        assert.deepEqual(ab.members(), ba.members())
      }),
      { numRuns: 50 },
    )
  })

  it('rejects records that are forged, altered or from another network', async () => {
    const [n0, n1] = nodes as [Node, Node]
    const other = await createNetwork('gamma')
    const set = new MemberSet(net.info)
    // A revocation signed by a member's key instead of the network key.
    const byMember: SignedRecord = {
      body: Buffer.from(
        JSON.stringify({ kind: 'revoke', networkId: net.info.id, peerId: n0.id, at: 1 }),
      ).toString('base64url'),
      sig: Buffer.from(await n1.key.sign(new Uint8Array(1))).toString('base64url'),
    }
    await assert.rejects(set.add(byMember), { name: 'RecordInvalidError' })
    await assert.rejects(set.add(await signRevocation(other, n0.id)), { name: 'RecordInvalidError' })
    // An entry whose invite is from another network.
    const foreign = (await createInvite(other, { bootstrap: [], ttlMs: 60_000 })).encoded
    await assert.rejects(
      set.add(
        await signEntry(n0.key, { peerId: n1.id, name: 'x', invite: foreign, addedBy: n0.id, addedAt: 1 }),
      ),
      { name: 'RecordInvalidError' },
    )
    // An entry that claims to be by someone else than its signer.
    const inv = (await createInvite(net, { bootstrap: [], ttlMs: 60_000 })).encoded
    await assert.rejects(
      set.add(await signEntry(n0.key, { peerId: n1.id, name: 'x', invite: inv, addedBy: n1.id, addedAt: 1 })),
      { name: 'RecordInvalidError' },
    )
    // An entry added after its invite expired (a backdated admission shows as this).
    const short = await createInvite(net, { bootstrap: [], ttlMs: 10, now: 1000 })
    await assert.rejects(
      set.add(
        await signEntry(n0.key, {
          peerId: n1.id,
          name: 'x',
          invite: short.encoded,
          addedBy: n0.id,
          addedAt: 2000,
        }),
      ),
      { name: 'RecordInvalidError' },
    )
    // Bound to another peer.
    const bound = (await createInvite(net, { bootstrap: [], ttlMs: 60_000, boundPeer: n0.id })).encoded
    await assert.rejects(
      set.add(
        await signEntry(n0.key, { peerId: n1.id, name: 'x', invite: bound, addedBy: n0.id, addedAt: 1 }),
      ),
      { name: 'RecordInvalidError' },
    )
    assert.equal(set.size, 0)
  })

  it('fuzz: verifyRecord on random values only throws RecordInvalidError', async () => {
    const good = pool[1]!
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.anything(),
          fc.record({ body: fc.string({ maxLength: 200 }), sig: fc.string({ maxLength: 100 }) }),
          fc.record({ body: fc.base64String({ maxLength: 400 }), sig: fc.constant(good.sig) }),
          fc
            .jsonValue()
            .map((v) => ({ body: Buffer.from(JSON.stringify(v)).toString('base64url'), sig: good.sig })),
          fc
            .tuple(fc.nat({ max: good.body.length - 1 }), fc.constantFrom('A', 'b', '_', '-'))
            .map(([i, c]) => ({ body: good.body.slice(0, i) + c + good.body.slice(i + 1), sig: good.sig })),
        ),
        async (v) => {
          try {
            await verifyRecord(net.info, v)
            // only the untouched record can pass
            assert.deepEqual(v, good)
          } catch (err) {
            assert.equal((err as Error).name, 'RecordInvalidError', (err as Error).message)
          }
        },
      ),
      { numRuns: 300 },
    )
  })
})
