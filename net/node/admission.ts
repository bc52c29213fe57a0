/**
 * Admission: a new host presents a signed invite to one of its bootstraps (through a dial-only libp2p
 * node: it is not a member yet), the member there checks it (network, signature, expiry, binding,
 * single use) and records the admission as an entry it signs, embedding the invite, so every member can
 * verify it on its own. The network key's holder also makes invites, revokes members, and admits itself.
 */
import type { Connection, Stream } from '@libp2p/interface'
import { multiaddr } from '@multiformats/multiaddr'
import { describeError } from '../../src/base/errors.ts'
import { ControlError } from '../control/errors.ts'
import { encodeJson } from '../control/framing.ts'
import {
  ADMIT_PROTOCOL,
  type AdmitResponse,
  decodeAdmitRequest,
  decodeAdmitResponse,
  MAX_ADMIT_FRAME,
  MAX_MEMBERS_FRAME,
} from '../control/protocols.ts'
import { FramedStream } from '../control/stream.ts'
import type { Identity } from '../identity/index.ts'
import {
  AdmissionRefusedError,
  InviteUsedError,
  MembershipError,
  NetworkKeyError,
  PeerRevokedError,
} from '../membership/errors.ts'
import type { SignedRecord } from '../membership/interfaces.ts'
import { createInvite, verifyInvite } from '../membership/invite.ts'
import { MemberSet, signEntry, signRevocation } from '../membership/member-set.ts'
import { type NetworkKey, networkInfoFromPublic } from '../membership/network.ts'
import { NodeStateError } from './errors.ts'
import type { Admission, MemberGate, NodeContext } from './interfaces.ts'
import { createControlPlane } from './libp2p.ts'

/** The key holder's own admission invite only has to live for the moment it is used. */
const SELF_INVITE_TTL_MS = 60_000
const MAX_INVITE_BOOTSTRAP = 16

export interface AdmissionInit {
  ctx: NodeContext
  /** This node's identity (loaded on first use). */
  identity(): Promise<Identity>
  /** This member's display name. */
  name: string
  networkKey: NetworkKey | undefined
  pnet: boolean
  /** This node is a bootstrap (its own addresses go into the invites it makes). */
  bootstrapRelay: boolean
  gate: Pick<MemberGate, 'refuse'>
  /** The member set changed (gossip: save, push, enforce). */
  changed(source: string | undefined, added?: readonly SignedRecord[]): void
}

export function createAdmission(init: AdmissionInit): Admission {
  const { ctx, gate } = init
  const state = ctx.state
  let chain: Promise<unknown> = Promise.resolve()

  const admit = async (peer: string, invite: string, name: string): Promise<void> => {
    const set = state.set
    const network = state.network
    if (set === undefined || network === undefined) throw new NodeStateError('not started')
    const identity = await init.identity()
    if (set.isRevoked(peer)) throw new PeerRevokedError(peer)
    if (set.isMember(peer)) return
    const inv = await verifyInvite(invite, { network, presenter: peer })
    const holder = set.nonceHolder(inv.body.nonce)
    if (holder !== undefined && holder !== peer) throw new InviteUsedError(holder)
    const record = await signEntry(identity.privateKey, {
      peerId: peer,
      name,
      invite: inv.encoded,
      addedBy: ctx.self,
      addedAt: Date.now(),
    })
    await set.add(record)
    ctx.log.info(`admitted ${peer} (${name})`)
    ctx.emit('admitted', { peer, name })
    // Not back to the joiner: it gets the set in the admission reply (and its admission node serves
    // nothing else).
    init.changed(peer, [record])
  }

  return {
    async join(invite, signal) {
      const identity = await init.identity()
      const self = ctx.self
      if (state.network === undefined) await state.load()
      const inv = await verifyInvite(invite, { presenter: self })
      const network = networkInfoFromPublic(inv.body.networkName, inv.body.networkPublicKey)
      if (state.network !== undefined) {
        if (state.network.id !== network.id)
          throw new MembershipError(
            `this state dir is already in network ${state.network.id}; use another state dir`,
          )
        if (state.isMember(self)) return
      }
      const addrs = [...new Set([...inv.body.bootstrap, ...state.bootstrap])]
      if (addrs.length === 0) throw new MembershipError('the invite names no bootstrap address')
      const tmp = await createControlPlane({
        kind: 'joiner',
        privateKey: identity.privateKey,
        network,
        pnet: init.pnet,
      })
      let lastErr: unknown
      try {
        for (const addr of addrs) {
          const attempt = AbortSignal.any([
            AbortSignal.timeout(ctx.timing.requestTimeoutMs),
            ...(signal ? [signal] : []),
          ])
          let resp: AdmitResponse
          try {
            const stream = await tmp.dialProtocol(multiaddr(addr), ADMIT_PROTOCOL, { signal: attempt })
            const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
            framed.write(new TextEncoder().encode(JSON.stringify({ invite: inv.encoded, name: init.name })))
            resp = decodeAdmitResponse(await framed.read({ signal: attempt, what: `admission at ${addr}` }))
            await framed.close()
          } catch (err) {
            if (signal?.aborted === true) throw err
            lastErr = err
            ctx.log.warn(`admission via ${addr} failed: ${describeError(err)}`)
            continue
          }
          // A refusal is the network's answer (every member applies the same rules): do not shop around.
          if (!resp.ok) throw new AdmissionRefusedError(resp.reason, { code: resp.code })
          const set = new MemberSet(network)
          await set.merge(resp.records)
          if (!set.isMember(self)) throw new AdmissionRefusedError('the member did not record our admission')
          state.adopt(network, set)
          state.addBootstrap(inv.body.bootstrap)
          await state.persist()
          ctx.log.info(
            `joined network ${network.name} (${network.id}) via ${addr}; ${set.members().length} members`,
          )
          return
        }
      } finally {
        await tmp.stop()
      }
      throw new AdmissionRefusedError(`no bootstrap reachable (${describeError(lastErr)})`, {
        cause: lastErr,
        code: 'E_NO_BOOTSTRAP',
      })
    },

    async admitSelf() {
      const key = init.networkKey
      if (key === undefined) throw new NetworkKeyError('admitting itself needs the network key')
      const identity = await init.identity()
      if (state.network !== undefined && state.network.id !== key.info.id)
        throw new NetworkKeyError(
          `this node is in network ${state.network.id}, the key is for ${key.info.id}`,
        )
      if (state.network === undefined || state.set === undefined)
        state.adopt(key.info, new MemberSet(key.info))
      const set = state.set!
      if (set.isMember(ctx.self) || set.isRevoked(ctx.self)) return
      // A short invite bound to itself: its entry then verifies exactly like everyone else's.
      const inv = await createInvite(key, { bootstrap: [], ttlMs: SELF_INVITE_TTL_MS, boundPeer: ctx.self })
      await set.add(
        await signEntry(identity.privateKey, {
          peerId: ctx.self,
          name: init.name,
          invite: inv.encoded,
          addedBy: ctx.self,
          addedAt: Date.now(),
        }),
      )
      await state.persist()
    },

    async handle(stream: Stream, conn: Connection) {
      const peer = conn.remotePeer.toString()
      // The request is small (an invite and a name) and comes from a stranger: read it under the small
      // limit. The reply carries the whole member set (~650 bytes a member), so it goes out under the
      // member-set limit, straight on the stream (the framed stream's own limit is the request's).
      const framed = new FramedStream(stream, MAX_ADMIT_FRAME)
      const reply = (resp: AdmitResponse) => {
        if (framed.isEnded) throw new ControlError('the joiner closed the admission stream')
        stream.send(encodeJson(resp, MAX_MEMBERS_FRAME))
        void framed.close()
      }
      try {
        const req = decodeAdmitRequest(
          await framed.read({ timeoutMs: ctx.timing.requestTimeoutMs, what: 'invite' }),
        )
        // One admission at a time: the nonce check and the entry that uses the nonce must not interleave.
        const run = chain.then(() => admit(peer, req.invite, req.name))
        chain = run.catch(() => {})
        await run
        reply({ ok: true, records: state.set?.list() ?? [] })
      } catch (err) {
        gate.refuse(peer, ADMIT_PROTOCOL, err as Error)
        if (err instanceof MembershipError || err instanceof ControlError) {
          try {
            reply({ ok: false, code: err.code, reason: describeError(err) })
          } catch {
            stream.abort(err)
          }
        } else stream.abort(err as Error)
      }
    },

    async invite(options) {
      const key = init.networkKey
      if (key === undefined) throw new NetworkKeyError('making an invite needs the network key')
      const bootstrap =
        options.bootstrap ??
        [
          ...(init.bootstrapRelay || state.bootstrap.length === 0
            ? ctx.addresses().filter((a) => !a.includes('/p2p-circuit'))
            : []),
          ...state.bootstrap,
        ].slice(0, MAX_INVITE_BOOTSTRAP)
      const inv = await createInvite(key, {
        bootstrap,
        ttlMs: options.ttlMs,
        ...(options.bind === undefined ? {} : { boundPeer: options.bind }),
      })
      return inv.encoded
    },

    async revoke(peer) {
      const key = init.networkKey
      if (key === undefined) throw new NetworkKeyError('revoking a member needs the network key')
      const set = state.set
      if (set === undefined) throw new NodeStateError('not started')
      if (peer === ctx.self) throw new MembershipError('a node cannot revoke itself')
      if (set.isRevoked(peer)) return
      const revocation = await signRevocation(key, peer)
      await set.add(revocation)
      ctx.log.info(`revoked ${peer}`)
      init.changed(undefined, [revocation])
    },
  }
}
