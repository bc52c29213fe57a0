/**
 * The membership gate: nothing but a current member gets a stream on any protocol (the mesh ones and
 * libp2p's own identify and ping), a relay reservation or a relayed connection; a stranger's connection
 * gets a short window to present an invite on the admission protocol, then it is closed.
 */
import type { Connection, PeerId, Stream, StreamHandler } from '@libp2p/interface'
import type { Libp2p } from 'libp2p'
import { describeError, MeshError } from '../../src/base/errors.ts'
import { NotMemberError, PeerRevokedError } from '../membership/errors.ts'
import type { MemberGate, NodeContext } from './interfaces.ts'
import { registeredHandler } from './libp2p.ts'

/** An unknown peer is asked for the records about itself at most this often. */
const PULL_EVERY_MS = 10_000
const PULL_TIMEOUT_MS = 5000

export interface MemberGateInit {
  ctx: NodeContext
  /** Asks `peer` for the records about itself (a member admitted elsewhere, whose gossip is late). */
  pullSelf(peer: string, signal: AbortSignal): Promise<void>
}

function errorCode(err: unknown): string {
  return err instanceof MeshError ? err.code : 'E_INTERNAL'
}

export function createMemberGate({ ctx, pullSelf }: MemberGateInit): MemberGate {
  const pulls = new Map<string, { at: number; result: Promise<boolean> }>()
  const state = ctx.state

  const refuse = (peer: string, protocol: string, err: Error): void => {
    const code = errorCode(err)
    ctx.log.warn(`refused ${peer} on ${protocol}: ${describeError(err)}`)
    ctx.emit('refused', { peer, protocol, code, reason: describeError(err) })
  }

  /**
   * True when `peer` is a current member. A peer we do not know yet may have just been admitted by
   * another member whose gossip has not reached us: ask the peer itself for the records about it (they
   * are self-verifying), at most once per peer per 10 s so strangers cannot make us work much.
   */
  const ensureMember = (peer: string): Promise<boolean> => {
    const set = state.set
    if (set === undefined) return Promise.resolve(false)
    if (set.isMember(peer)) return Promise.resolve(true)
    if (set.isRevoked(peer) || ctx.libp2p === undefined) return Promise.resolve(false)
    const prev = pulls.get(peer)
    if (prev !== undefined && Date.now() - prev.at < PULL_EVERY_MS)
      return prev.result.then(() => set.isMember(peer))
    const result = pullSelf(peer, AbortSignal.timeout(Math.min(ctx.timing.requestTimeoutMs, PULL_TIMEOUT_MS)))
      .then(() => set.isMember(peer))
      .catch(() => false)
    pulls.set(peer, { at: Date.now(), result })
    return result
  }

  const guard = (
    protocol: string,
    handler: (stream: Stream, conn: Connection) => Promise<void>,
  ): StreamHandler => {
    return async (stream, conn) => {
      const peer = conn.remotePeer.toString()
      if (!(await ensureMember(peer))) {
        const err = state.isRevoked(peer) ? new PeerRevokedError(peer) : new NotMemberError(peer)
        refuse(peer, protocol, err)
        stream.abort(err)
        return
      }
      try {
        await handler(stream, conn)
      } catch (err) {
        ctx.log.warn(`${protocol} from ${peer}: ${describeError(err)}`)
        stream.abort(err as Error)
      }
    }
  }

  return {
    refuse,
    ensureMember,
    guard,

    connectionGater() {
      const revoked = (p: PeerId) => state.isRevoked(p.toString())
      return {
        // A revoked peer may still connect: its first stream is refused with a clear reason (and the
        // admission window then closes the connection), which is what its operator needs to see.
        denyDialPeer: (p: PeerId) => revoked(p),
        denyOutboundEncryptedConnection: (p: PeerId) => revoked(p),
        denyInboundRelayedConnection: (_relay: PeerId, p: PeerId) => revoked(p),
        // Only members may hold a reservation on our relay, or be relayed by it, and only to members.
        denyInboundRelayReservation: async (p: PeerId) => {
          const ok = await ensureMember(p.toString())
          if (!ok) refuse(p.toString(), 'relay-reservation', new NotMemberError(p.toString()))
          return !ok
        },
        denyOutboundRelayedConnection: async (src: PeerId, dst: PeerId) =>
          !((await ensureMember(src.toString())) && state.isMember(dst.toString())),
      }
    },

    async guardBuiltins(node: Libp2p, skip: readonly string[]) {
      for (const protocol of node.getProtocols()) {
        if (skip.includes(protocol)) continue
        if (protocol.includes('/libp2p/circuit/relay/')) continue // gated by the connection gater
        const rec = registeredHandler(node, protocol)
        if (rec === undefined) continue
        const original = rec.handler
        await node.handle(
          protocol,
          guard(protocol, async (s, c) => {
            await original(s, c)
          }),
          { ...rec.options, force: true },
        )
      }
    },

    admissionWindow(conn) {
      const peer = conn.remotePeer.toString()
      const timer = setTimeout(() => {
        if (ctx.libp2p === undefined || state.isMember(peer)) return
        if (conn.status !== 'open') return
        refuse(peer, 'connection', new NotMemberError(peer))
        void conn.close().catch(() => {})
      }, ctx.timing.admissionWindowMs)
      timer.unref?.()
    },
  }
}
