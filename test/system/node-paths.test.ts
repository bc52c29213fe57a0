/**
 * Member-only access on the bulk paths (loopback): a peer that is not a member can neither open the
 * direct-path protocol on a connection to a member, nor get a relayed connection to a member through
 * the bootstrap's relay (the path bulk channels fall back to between members behind symmetric NATs).
 */
import '../../net/polyfill.ts'
import assert from 'node:assert/strict'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { identify } from '@libp2p/identify'
import { peerIdFromString } from '@libp2p/peer-id'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p, type Libp2p } from 'libp2p'
import { DIRECT_PROTOCOL } from '../../net/link/direct/paths.ts'
import { createNetwork } from '../../net/membership/network.ts'
import { useLoopbackNodes, waitFor } from '../helpers/loopback-nodes.ts'

describe('mesh node: bulk paths are for members only (loopback)', function () {
  this.timeout(120_000)
  const { mk } = useLoopbackNodes()
  let stranger: Libp2p | undefined

  after(async () => {
    await stranger?.stop()
  })

  it('a non-member is refused on /mesh/direct/1 and cannot be relayed to a member', async () => {
    const key = await createNetwork('pathsnet')
    const boot = await mk('boot', { networkKey: key, bootstrapRole: { relay: true } })
    await boot.start()
    const m = await mk('m', { invite: await boot.invite({ ttlMs: 60_000 }) })
    await m.start()
    await waitFor('m has a relay reservation on boot', () =>
      m.addresses().some((a) => a.includes('/p2p-circuit')),
    )
    const refused: { peer: string; protocol: string; code: string }[] = []
    m.on('refused', (e) => refused.push(e))
    stranger = await createLibp2p({
      privateKey: await generateKeyPair('Ed25519'),
      addresses: { listen: [] },
      transports: [tcp(), circuitRelayTransport()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      services: { identify: identify() },
    })
    await stranger.start()
    const strangerId = stranger.peerId.toString()

    // Directly: the connection is allowed (it may come to present an invite), the protocol is not.
    const direct = m.addresses().find((a) => !a.includes('/p2p-circuit'))!
    const stream = await stranger.dialProtocol(multiaddr(direct), DIRECT_PROTOCOL).catch((err: Error) => err)
    if (!(stream instanceof Error)) {
      // Negotiated, then reset before a byte is read: reading ends in an error or at once.
      await waitFor('stream reset', () => stream.status !== 'open', 10_000)
    }
    await waitFor('refusal', () => refused.some((r) => r.protocol === DIRECT_PROTOCOL))
    const r = refused.find((x) => x.protocol === DIRECT_PROTOCOL)!
    assert.equal(r.peer, strangerId)
    assert.equal(r.code, 'E_NOT_MEMBER')

    // Through the bootstrap's relay: refused by the relay's gate (the stranger is no member).
    const circuit = m.addresses().find((a) => a.includes('/p2p-circuit'))!
    await stranger.hangUp(peerIdFromString(m.peerId)).catch(() => {})
    const relayed = await stranger
      .dial(multiaddr(circuit), { signal: AbortSignal.timeout(15_000) })
      .catch((err: Error) => err)
    assert.ok(relayed instanceof Error, 'a relayed connection for a non-member must fail')
  })
})
