/**
 * Member-set replication: push-pull exchanges of signed records (and unsigned address hints) with
 * connected members, a full exchange with every member that connects, anti-entropy now and then, and
 * what follows a change: save, enforce revocations (close the revoked peer's links, tell it, hang up),
 * push to everyone else. Gossip stops by itself once an exchange adds nothing.
 */
import type { Connection, Stream } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { describeError } from '../../src/base/errors.ts'
import {
  decodeMembersMessage,
  MAX_MEMBERS_FRAME,
  MEMBERS_PROTOCOL,
  type MembersMessage,
} from '../control/protocols.ts'
import { FramedStream } from '../control/stream.ts'
import { PeerRevokedError } from '../membership/errors.ts'
import type { SignedRecord } from '../membership/interfaces.ts'
import { NodeStateError } from './errors.ts'
import type { Gossip, GossipStats, NodeContext } from './interfaces.ts'

const MAX_HINTS = 16
/** A revoked peer gets this long to take its one-way notice before we hang up. */
const NOTICE_TIMEOUT_MS = 2000

export interface GossipInit {
  ctx: NodeContext
  /** Forgets (and closes the links of) the peers `drop` selects; returns them. */
  dropPeers(drop: (peer: string) => boolean, reason: (peer: string) => Error): string[]
  /** Makes sure every current member is supervised. */
  trackMembers(): void
}

export function createGossip({ ctx, dropPeers, trackMembers }: GossipInit): Gossip {
  const hints = new Map<string, string[]>()
  let selfRevoked = false
  const counters: GossipStats = { sent: 0, received: 0, bytesOut: 0, bytesIn: 0 }
  const send = (framed: FramedStream, msg: MembersMessage): void => {
    const bytes = new TextEncoder().encode(JSON.stringify(msg))
    counters.sent++
    counters.bytesOut += bytes.byteLength
    framed.write(bytes)
  }
  const receive = (frame: Uint8Array): MembersMessage => {
    counters.received++
    counters.bytesIn += frame.byteLength
    return decodeMembersMessage(frame)
  }
  const state = ctx.state

  const addrHints = (): Record<string, string[]> => {
    const out: Record<string, string[]> = {}
    for (const [p, list] of hints) if (state.isMember(p)) out[p] = list
    const own = ctx.addresses().slice(0, MAX_HINTS)
    if (own.length > 0) out[ctx.self] = own
    return out
  }

  const learnHints = (addrs: Readonly<Record<string, readonly string[]>>): void => {
    for (const [p, list] of Object.entries(addrs)) {
      if (p === ctx.self || !state.isMember(p)) continue
      hints.set(p, list.slice(0, MAX_HINTS))
    }
  }

  const recordsAbout = (peer: string): SignedRecord[] =>
    (state.set?.list() ?? []).filter((r) => {
      try {
        const body = JSON.parse(Buffer.from(r.body, 'base64url').toString('utf8')) as { peerId?: unknown }
        return body.peerId === peer
      } catch {
        return false
      }
    })

  const exchange: Gossip['exchange'] = async (peer, want, { signal, notice = false }) => {
    const node = ctx.libp2p
    const set = state.set
    if (node === undefined || set === undefined) return
    // A revoked peer only ever gets the one-way notice from evict(); nothing it says is merged.
    if (set.isRevoked(peer) && !notice) return
    const stream = await node.dialProtocol(peerIdFromString(peer), MEMBERS_PROTOCOL, {
      signal,
      runOnLimitedConnection: true,
    })
    const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
    const msg: MembersMessage = { want, records: want === 'all' ? set.list() : [], addrs: addrHints() }
    send(framed, msg)
    if (notice) {
      await framed.close()
      return
    }
    const resp = receive(await framed.read({ signal, what: 'member set' }))
    await framed.close()
    const { added, invalid } = await set.merge(resp.records)
    if (invalid > 0) ctx.log.warn(`member set from ${peer}: ${invalid} invalid records ignored`)
    learnHints(resp.addrs)
    if (added > 0) changed(peer)
  }

  /** Tells a revoked peer (it then stops knocking: `self-revoked`), then hangs up on it. */
  const evict = async (peer: string): Promise<void> => {
    const node = ctx.libp2p
    if (node === undefined) return
    const id = peerIdFromString(peer)
    if (node.getConnections(id).length > 0) {
      await exchange(peer, 'all', { signal: AbortSignal.timeout(NOTICE_TIMEOUT_MS), notice: true }).catch(
        () => {},
      )
    }
    await node.hangUp(id).catch(() => {})
  }

  /** After any change: save, enforce revocations, and push to every connected member (except the source:
   *  it already has what we merged from it). */
  const changed = (source: string | undefined): void => {
    const set = state.set
    const node = ctx.libp2p
    if (set === undefined) return
    void state.persist().catch(() => {})
    ctx.emit('members-changed', { members: set.members().length })
    if (set.isRevoked(ctx.self) && !selfRevoked) {
      selfRevoked = true
      ctx.log.error('this node has been revoked from the network; closing all links')
      ctx.emit('self-revoked', { network: state.network?.id ?? '' })
    }
    const dropped = dropPeers(
      (peer) => selfRevoked || set.isRevoked(peer),
      (peer) => new PeerRevokedError(peer),
    )
    if (node !== undefined && !selfRevoked) for (const peer of dropped) void evict(peer)
    if (selfRevoked) {
      if (node !== undefined) for (const c of node.getConnections()) void c.close().catch(() => {})
      return
    }
    trackMembers()
    if (node === undefined) return
    const connected = new Set(node.getConnections().map((c) => c.remotePeer.toString()))
    for (const peer of connected) {
      if (peer === source || !set.isMember(peer)) continue
      void exchange(peer, 'all', { signal: AbortSignal.timeout(ctx.timing.requestTimeoutMs) }).catch((err) =>
        ctx.log.warn(`gossip to ${peer} failed: ${describeError(err)}`),
      )
    }
  }

  return {
    exchange,
    changed,
    recordsAbout,
    hints: (peer) => hints.get(peer) ?? [],
    stats: () => ({ ...counters }),
    get selfRevoked() {
      return selfRevoked
    },

    async handle(stream: Stream, conn: Connection) {
      const peer = conn.remotePeer.toString()
      const set = state.set
      if (set === undefined) throw new NodeStateError('not started')
      const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
      const req = receive(await framed.read({ timeoutMs: ctx.timing.requestTimeoutMs }))
      const { added, invalid } = await set.merge(req.records)
      if (invalid > 0) ctx.log.warn(`member set from ${peer}: ${invalid} invalid records ignored`)
      learnHints(req.addrs)
      const records = req.want === 'all' ? set.list() : req.want === 'self' ? recordsAbout(ctx.self) : []
      const resp: MembersMessage = { want: 'none', records, addrs: req.want === 'self' ? {} : addrHints() }
      send(framed, resp)
      await framed.close()
      if (added > 0) changed(peer)
    },
  }
}
