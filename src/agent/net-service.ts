import { createDiag, type Diag } from '../../net/diag/diag.ts'
import type { IceServer, MemberStatus, MeshNode, MeshNodeInit } from '../../net/interfaces.ts'
import { createMeshNode } from '../../net/node.ts'
import { MeshError, UsageError } from '../base/errors.ts'
import type { Logger } from '../base/log.ts'
import type { ControlHandlers, NetStatus, PeerRow } from '../control/api.ts'
import type { AgentService } from './interfaces.ts'

export class PeerNotFoundError extends MeshError {
  constructor(message: string) {
    super(message, { code: 'E_PEER_NOT_FOUND' })
  }
}

export interface NetServiceInit extends Omit<MeshNodeInit, 'log' | 'signal'> {
  log: Logger
}

export interface NetService extends AgentService {
  handlers(): ControlHandlers<'peers' | 'ping' | 'bench' | 'invite' | 'revoke'>
  readonly node: MeshNode
  /** Resolves a member by name, PeerId or unique PeerId prefix. */
  resolvePeer(ref: string): MemberStatus
}

/** STUN servers derived from bootstrap multiaddrs: bootstraps answer STUN on the default port. */
export function stunFromBootstrap(bootstrap: readonly string[], port = 3478): IceServer[] {
  const hosts = new Set<string>()
  for (const b of bootstrap) {
    const m = /^\/ip4\/([\d.]+)\/tcp\//.exec(b)
    if (m?.[1] !== undefined && m[1] !== '127.0.0.1') hosts.add(m[1])
  }
  return [...hosts].map((h) => ({ urls: `stun:${h}:${port}` }))
}

function asObject(params: unknown): Record<string, unknown> {
  return typeof params === 'object' && params !== null ? (params as Record<string, unknown>) : {}
}

/** The overlay node as an agent service: membership, links, and the operator's network methods. */
export function createNetService(init: NetServiceInit): NetService {
  const log = init.log
  const node = createMeshNode({ ...init, log })
  let diag: Diag | undefined

  const resolvePeer = (ref: string): MemberStatus => {
    const members = node.members({ includeDropped: true }).filter((m) => !m.self)
    const exact = members.find((m) => m.peerId === ref || m.name === ref)
    if (exact !== undefined) return exact
    const byPrefix = members.filter((m) => m.peerId.startsWith(ref))
    if (byPrefix.length === 1) return byPrefix[0]!
    if (byPrefix.length > 1)
      throw new UsageError(`'${ref}' matches ${byPrefix.length} members; give more of the PeerId`)
    throw new PeerNotFoundError(`no member named '${ref}' (see 'mesh peers')`)
  }

  const peerRow = (m: MemberStatus): PeerRow => ({
    id: m.peerId,
    name: m.name,
    state: m.state,
    link: m.link,
    ...(m.path === undefined ? {} : { path: m.path }),
    ...(m.direct === undefined ? {} : { direct: m.direct }),
    ...(m.bulk === undefined ? {} : { bulk: m.bulk }),
    ...(m.rttMs === undefined ? {} : { rttMs: m.rttMs }),
    ...(m.relayed === undefined ? {} : { relayed: m.relayed }),
  })

  return {
    name: 'net',
    node,
    resolvePeer,
    async start() {
      await node.start()
      diag = createDiag(node.overlay, log)
      node.on('link-up', (e) => log.info('link up', { peer: e.peer, path: e.path }))
      node.on('link-direct', (e) => log.info('bulk channels direct', { peer: e.peer, remote: e.remote }))
      node.on('link-down', (e) => log.info('link down', { peer: e.peer, reason: e.reason }))
      node.on('refused', (e) => log.warn('refused', { peer: e.peer, protocol: e.protocol, code: e.code }))
      node.on('admitted', (e) => log.info('admitted member', { peer: e.peer, name: e.name }))
    },
    async stop() {
      diag?.stop()
      await node.stop()
    },
    status(): NetStatus {
      const members = node.members()
      return {
        peerId: node.peerId,
        name: init.name,
        network: { id: node.networkId, name: node.networkName },
        members: members.length,
        linksOpen: node.overlay.links().filter((l) => l.state === 'open').length,
        listen: node.addresses(),
        tcpCongestion: node.congestion(),
        gossip: node.gossipStats(),
      }
    },
    handlers() {
      return {
        peers: async () => ({
          peers: node
            .members()
            .filter((m) => !m.self)
            .map(peerRow),
        }),
        ping: async (params, ctx) => {
          const p = asObject(params)
          const m = resolvePeer(String(p.peer ?? ''))
          const count = Math.min(Math.max(Number(p.count ?? 4), 1), 1000)
          const rtts: number[] = []
          for (let seq = 1; seq <= count; seq++) {
            const rttMs = await diag!.ping(m.peerId, { signal: ctx.signal })
            rtts.push(rttMs)
            ctx.emit({ seq, rttMs, path: node.overlay.link(m.peerId)?.path.type })
            if (seq < count) await new Promise((r) => setTimeout(r, 200))
          }
          return { peer: m.name, peerId: m.peerId, rttMs: rtts }
        },
        bench: async (params, ctx) => {
          const p = asObject(params)
          const m = resolvePeer(String(p.peer ?? ''))
          const bytes = Math.min(Math.max(Number(p.bytes ?? 64 * 2 ** 20), 1), 4 * 2 ** 30)
          if (p.over === 'libp2p') {
            const r = await node.benchStream(m.peerId, bytes, { signal: ctx.signal })
            return {
              peer: m.name,
              peerId: m.peerId,
              over: 'libp2p',
              ...r,
              path: r.direct ? 'direct-tcp' : 'relayed',
            }
          }
          const r = await diag!.bench(m.peerId, bytes, { signal: ctx.signal })
          const link = node.overlay.link(m.peerId)
          return {
            peer: m.name,
            peerId: m.peerId,
            over: 'link',
            ...r,
            path: link?.path.type,
            ...(link?.path.direct === undefined ? {} : { direct: link.path.direct }),
            ...(link?.path.bulk === undefined ? {} : { bulk: link.path.bulk }),
          }
        },
        invite: async (params) => {
          const p = asObject(params)
          const ttlMs = Number(p.ttlMs ?? 3_600_000)
          if (!(ttlMs > 0)) throw new UsageError('--ttl must be positive')
          const invite = await node.invite({
            ttlMs,
            ...(typeof p.bind === 'string' ? { bind: p.bind } : {}),
            ...(Array.isArray(p.bootstrap) ? { bootstrap: p.bootstrap.map(String) } : {}),
          })
          return { invite }
        },
        revoke: async (params) => {
          const m = resolvePeer(String(asObject(params).peer ?? ''))
          await node.revoke(m.peerId)
          return { revoked: m.peerId, name: m.name }
        },
      } satisfies ControlHandlers<'peers' | 'ping' | 'bench' | 'invite' | 'revoke'>
    },
  }
}
