/**
 * Member-set replication: signed records (and unsigned address hints) reconciled between members by
 * digest (`/mesh/members/2`, see net/control/protocols.ts): what changed is pushed to the connected
 * members this node keeps links to (its warm ring neighbours and on-demand links), a member that
 * connects and anti-entropy now and then compare digests and send only the difference. After a change:
 * save, enforce revocations (close the revoked peer's links, tell it, hang up), push on. Gossip stops by
 * itself once an exchange adds nothing. Members of an older version speak `/mesh/members/1` (whole sets).
 */
import type { Connection, Stream } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { describeError } from '../../src/base/errors.ts'
import {
  decodeMembersMessage,
  decodeMembersSync,
  MAX_MEMBERS_FRAME,
  MEMBERS_PROTOCOL,
  MEMBERS_PROTOCOL_V2,
  type MembersMessage,
  type MembersSyncMessage,
} from '../control/protocols.ts'
import { FramedStream } from '../control/stream.ts'
import { PeerRevokedError } from '../membership/errors.ts'
import type { SignedRecord } from '../membership/interfaces.ts'
import { NodeStateError } from './errors.ts'
import type { Gossip, GossipStats, NodeContext } from './interfaces.ts'

const MAX_HINTS = 16
/** A change goes to at least this many connected members (the kept ones first): an epidemic with fan-out
 *  8 reaches 50 members in about two rounds. */
const PUSH_FANOUT = 8

/** The member a record is about (entries and revocations both name it), undefined for garbage. */
function peerOf(r: SignedRecord): string | undefined {
  try {
    const body = JSON.parse(Buffer.from(r.body, 'base64url').toString('utf8')) as { peerId?: unknown }
    return typeof body.peerId === 'string' ? body.peerId : undefined
  } catch {
    return undefined
  }
}
/** A revoked peer gets this long to take its one-way notice before we hang up. */
const NOTICE_TIMEOUT_MS = 2000

export interface GossipInit {
  ctx: NodeContext
  /** Forgets (and closes the links of) the peers `drop` selects; returns them. */
  dropPeers(drop: (peer: string) => boolean, reason: (peer: string) => Error): string[]
  /** Makes sure every current member is supervised. */
  trackMembers(): void
  /** Whether a change is pushed to this connected member (default: every one). The node pushes to the
   *  members it keeps links to: ring neighbours carry a change around the whole ring. */
  pushTo?(peer: string): boolean
}

export function createGossip({ ctx, dropPeers, trackMembers, pushTo }: GossipInit): Gossip {
  const hints = new Map<string, string[]>()
  let selfRevoked = false
  const counters: GossipStats = { sent: 0, received: 0, bytesOut: 0, bytesIn: 0 }
  const send = (framed: FramedStream, msg: MembersMessage | MembersSyncMessage): void => {
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
  const receiveSync = (frame: Uint8Array): MembersSyncMessage => {
    counters.received++
    counters.bytesIn += frame.byteLength
    return decodeMembersSync(frame)
  }
  const state = ctx.state

  const addrHints = (): Record<string, string[]> => {
    const out: Record<string, string[]> = {}
    for (const [p, list] of hints) if (state.isMember(p)) out[p] = list
    const own = ctx.addresses().slice(0, MAX_HINTS)
    if (own.length > 0) out[ctx.self] = own
    return out
  }

  /** Own hints and those of the members the records are about (a new member's addresses travel with
   *  its record). */
  const hintsFor = (records: readonly SignedRecord[]): Record<string, string[]> => {
    const out: Record<string, string[]> = {}
    for (const r of records) {
      const p = peerOf(r)
      const h = p === undefined ? undefined : hints.get(p)
      if (p !== undefined && h !== undefined && state.isMember(p)) out[p] = h
    }
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
    (state.set?.list() ?? []).filter((r) => peerOf(r) === peer)

  /**
   * Reconciles with one member over /mesh/members/2 (frames in net/control/protocols.ts): `delta` is
   * what changed here (empty: only compare digests). A member of an older version gets the v1 exchange.
   */
  const sync = async (peer: string, delta: readonly SignedRecord[], signal: AbortSignal): Promise<void> => {
    const node = ctx.libp2p
    const set = state.set
    if (node === undefined || set === undefined || set.isRevoked(peer)) return
    const stream = await node.dialProtocol(peerIdFromString(peer), [MEMBERS_PROTOCOL_V2, MEMBERS_PROTOCOL], {
      signal,
      runOnLimitedConnection: true,
    })
    if (stream.protocol === MEMBERS_PROTOCOL) {
      await exchangeOver(stream, peer, 'all', signal)
      return
    }
    const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
    try {
      send(framed, { records: delta, digest: set.digest(), addrs: hintsFor(delta) })
      const r2 = receiveSync(await framed.read({ signal, what: 'member digest' }))
      learnHints(r2.addrs)
      if (r2.ids === undefined) return // same set
      const theirs = new Set(r2.ids)
      const mine = set.ids()
      const mineSet = new Set(mine)
      send(framed, {
        records: set.byIds(mine.filter((id) => !theirs.has(id))),
        wantIds: r2.ids.filter((id) => !mineSet.has(id)),
        addrs: {},
      })
      const r4 = receiveSync(await framed.read({ signal, what: 'member records' }))
      const { added, invalid, records } = await set.merge(r4.records)
      if (invalid > 0) ctx.log.warn(`member set from ${peer}: ${invalid} invalid records ignored`)
      if (added > 0) changed(peer, records)
    } finally {
      await framed.close().catch(() => {})
    }
  }

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
    await exchangeOver(stream, peer, want, signal, notice)
  }

  /** The v1 exchange on an open /mesh/members/1 stream. */
  const exchangeOver = async (
    stream: Stream,
    peer: string,
    want: 'all' | 'self',
    signal: AbortSignal,
    notice = false,
  ): Promise<void> => {
    const set = state.set
    if (set === undefined) return
    const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
    const msg: MembersMessage = { want, records: want === 'all' ? set.list() : [], addrs: addrHints() }
    send(framed, msg)
    if (notice) {
      await framed.close()
      return
    }
    const resp = receive(await framed.read({ signal, what: 'member set' }))
    await framed.close()
    const { added, invalid, records } = await set.merge(resp.records)
    if (invalid > 0) ctx.log.warn(`member set from ${peer}: ${invalid} invalid records ignored`)
    learnHints(resp.addrs)
    if (added > 0) changed(peer, records)
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

  /** After any change: save, enforce revocations, and push what changed (`added`; unknown: digests only)
   *  to the connected members we push to (except the source: it already has what we merged from it). */
  const changed = (source: string | undefined, added: readonly SignedRecord[] = []): void => {
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
    const connected = [...new Set(node.getConnections().map((c) => c.remotePeer.toString()))].filter(
      (peer) => peer !== source && set.isMember(peer),
    )
    const targets = pushTo === undefined ? connected : connected.filter((peer) => pushTo(peer))
    // While links are still coming up (a join storm) few kept members are connected yet: fill up to
    // PUSH_FANOUT with other connected members, so a change never waits for anti-entropy to spread.
    if (targets.length < PUSH_FANOUT) {
      const others = connected.filter((peer) => !targets.includes(peer))
      for (let i = others.length - 1; i > 0; i--) {
        const j = Math.floor(Math.random() * (i + 1))
        ;[others[i], others[j]] = [others[j]!, others[i]!]
      }
      targets.push(...others.slice(0, PUSH_FANOUT - targets.length))
    }
    for (const peer of targets) {
      void sync(peer, added, AbortSignal.timeout(ctx.timing.requestTimeoutMs)).catch((err) =>
        ctx.log.warn(`gossip to ${peer} failed: ${describeError(err)}`),
      )
    }
  }

  return {
    exchange,
    sync: (peer, delta, { signal }) => sync(peer, delta, signal),
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
      const { added, invalid, records: fresh } = await set.merge(req.records)
      if (invalid > 0) ctx.log.warn(`member set from ${peer}: ${invalid} invalid records ignored`)
      learnHints(req.addrs)
      const records = req.want === 'all' ? set.list() : req.want === 'self' ? recordsAbout(ctx.self) : []
      const resp: MembersMessage = { want: 'none', records, addrs: req.want === 'self' ? {} : addrHints() }
      send(framed, resp)
      await framed.close()
      if (added > 0) changed(peer, fresh)
    },

    async handleSync(stream: Stream, conn: Connection) {
      const peer = conn.remotePeer.toString()
      const set = state.set
      if (set === undefined) throw new NodeStateError('not started')
      const framed = new FramedStream(stream, MAX_MEMBERS_FRAME)
      const timeoutMs = ctx.timing.requestTimeoutMs
      const fresh: SignedRecord[] = []
      const mergeFrom = async (recs: readonly unknown[]) => {
        const r = await set.merge(recs)
        if (r.invalid > 0) ctx.log.warn(`member set from ${peer}: ${r.invalid} invalid records ignored`)
        fresh.push(...r.records)
      }
      try {
        const r1 = receiveSync(await framed.read({ timeoutMs }))
        await mergeFrom(r1.records)
        learnHints(r1.addrs)
        const digest = set.digest()
        if (digest === r1.digest) {
          send(framed, { records: [], digest, addrs: {} })
          return
        }
        send(framed, { records: [], digest, ids: set.ids(), addrs: addrHints() })
        const r3 = receiveSync(await framed.read({ timeoutMs }))
        await mergeFrom(r3.records)
        send(framed, { records: set.byIds(r3.wantIds ?? []), addrs: {} })
      } finally {
        await framed.close().catch(() => {})
        if (fresh.length > 0) changed(peer, fresh)
      }
    },
  }
}
