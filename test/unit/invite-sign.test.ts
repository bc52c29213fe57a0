import assert from 'node:assert/strict'
import { chmod, mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import fc from 'fast-check'
import { loadOrCreateIdentity } from '../../net/identity/index.ts'
import { MembershipError } from '../../net/membership/errors.ts'
import { createInvite, decodeInvite, INVITE_PREFIX, verifyInvite } from '../../net/membership/invite.ts'
import {
  createNetwork,
  loadNetworkKey,
  type NetworkKey,
  saveNetworkKey,
} from '../../net/membership/network.ts'

describe('invites', () => {
  let key: NetworkKey
  let other: NetworkKey
  let peer: string
  before(async () => {
    key = await createNetwork('alpha')
    other = await createNetwork('alpha')
    peer = peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()
  })

  it('a fresh invite verifies against the network and carries its fields', async () => {
    const inv = await createInvite(key, { bootstrap: ['/ip4/198.51.100.1/tcp/4001'], ttlMs: 60_000 })
    assert.ok(inv.encoded.startsWith(INVITE_PREFIX))
    assert.ok(!/\s/.test(inv.encoded), 'one copy-pasteable token')
    const v = await verifyInvite(inv.encoded, { network: key.info, presenter: peer })
    assert.equal(v.body.networkId, key.info.id)
    assert.deepEqual(v.body.bootstrap, ['/ip4/198.51.100.1/tcp/4001'])
    assert.equal(v.body.nonce.length, 22)
    // The joining side (no network yet) checks the invite against its own embedded key.
    await verifyInvite(`  ${inv.encoded}\n`)
  })

  it('expired invites are refused with InviteExpiredError', async () => {
    const inv = await createInvite(key, { bootstrap: [], ttlMs: 1000, now: 1_000 })
    await assert.rejects(verifyInvite(inv.encoded, { network: key.info, now: 2_000 }), {
      name: 'InviteExpiredError',
    })
    await verifyInvite(inv.encoded, { network: key.info, now: 1_999 })
  })

  it('a bound invite only admits its PeerId (InviteBoundError)', async () => {
    const inv = await createInvite(key, { bootstrap: [], ttlMs: 60_000, boundPeer: peer })
    await verifyInvite(inv.encoded, { network: key.info, presenter: peer })
    const stranger = peerIdFromPrivateKey(await generateKeyPair('Ed25519')).toString()
    await assert.rejects(verifyInvite(inv.encoded, { network: key.info, presenter: stranger }), {
      name: 'InviteBoundError',
    })
  })

  it('forgeries are refused: another key, a swapped key, a changed body', async () => {
    // Signed by another key that claims this network's id and key.
    const fake = await createInvite(
      { info: key.info, privateKey: other.privateKey },
      { bootstrap: [], ttlMs: 60_000 },
    )
    await assert.rejects(verifyInvite(fake.encoded, { network: key.info }), { name: 'InviteForgedError' })
    await assert.rejects(verifyInvite(fake.encoded), { name: 'InviteForgedError' })
    // A valid invite of another network with the same name: wrong network for our members.
    const foreign = await createInvite(other, { bootstrap: [], ttlMs: 60_000 })
    await assert.rejects(verifyInvite(foreign.encoded, { network: key.info }), {
      name: 'InviteWrongNetworkError',
    })
    // Tampering with the signed body (extend the expiry) breaks the signature.
    const inv = await createInvite(key, { bootstrap: [], ttlMs: 60_000 })
    const { body } = decodeInvite(inv.encoded)
    const sig = inv.encoded.split('.')[1]!
    const tampered = `${INVITE_PREFIX}${Buffer.from(JSON.stringify({ ...body, expiresAt: body.expiresAt + 1e9 })).toString('base64url')}.${sig}`
    await assert.rejects(verifyInvite(tampered, { network: key.info }), { name: 'InviteForgedError' })
  })

  it('fuzz: random strings and mutated invites only ever fail with membership errors', async () => {
    const inv = await createInvite(key, { bootstrap: ['/dns4/boot.example/tcp/1'], ttlMs: 60_000 })
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.string({ maxLength: 300 }),
          fc.string({ maxLength: 200 }).map((s) => `${INVITE_PREFIX}${s}`),
          fc
            .tuple(fc.nat({ max: inv.encoded.length - 1 }), fc.string({ minLength: 1, maxLength: 3 }))
            .map(([i, s]) => inv.encoded.slice(0, i) + s + inv.encoded.slice(i + 1)),
          fc
            .uint8Array({ maxLength: 600 })
            .map((b) => `${INVITE_PREFIX}${Buffer.from(b).toString('base64url')}.${'A'.repeat(86)}`),
        ),
        async (text) => {
          try {
            await verifyInvite(text, { network: key.info })
          } catch (err) {
            assert.ok(
              err instanceof MembershipError,
              `unexpected ${(err as Error).name}: ${(err as Error).message}`,
            )
          }
        },
      ),
      { numRuns: 400 },
    )
  })

  it('an over-long invite is refused before parsing', async () => {
    await assert.rejects(verifyInvite(`${INVITE_PREFIX}${'A'.repeat(10_000)}`), {
      name: 'InviteMalformedError',
    })
  })
})

describe('key files', () => {
  let dir: string
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'mesh-keys-'))
  })
  after(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('the identity is created once, mode 0600, and reloads to the same PeerId', async () => {
    const a = await loadOrCreateIdentity(join(dir, 'state'))
    const b = await loadOrCreateIdentity(join(dir, 'state'))
    assert.equal(a.peerId.toString(), b.peerId.toString())
    assert.equal((await stat(join(dir, 'state', 'identity.key'))).mode & 0o777, 0o600)
  })

  it('a network key file is written 0600, never overwritten, and refused when others can read it', async () => {
    const key = await createNetwork('beta')
    const path = join(dir, 'beta.key')
    await saveNetworkKey(path, key)
    assert.equal((await stat(path)).mode & 0o777, 0o600)
    const back = await loadNetworkKey(path)
    assert.equal(back.info.id, key.info.id)
    await assert.rejects(saveNetworkKey(path, key), { name: 'NetworkKeyError' })
    await chmod(path, 0o644)
    await assert.rejects(loadNetworkKey(path), { name: 'NetworkKeyError' })
    await writeFile(join(dir, 'junk.key'), 'nope', { mode: 0o600 })
    await assert.rejects(loadNetworkKey(join(dir, 'junk.key')), { name: 'NetworkKeyError' })
  })
})
