/**
 * The agent's Prometheus endpoint (`mesh agent --metrics [ADDR:PORT]`, default 127.0.0.1:9464): prom-client
 * (the Node client the Prometheus docs list; pinned) in a registry of its own, served on GET /metrics.
 * Values owned by other services (links, tunnel counters, chunk wire bytes, VMs) are read from their
 * status at scrape time; migrations are observed as they happen (state events and reports).
 *
 * Names follow the Prometheus conventions: base units (seconds, bytes), `_total` for counters.
 */
import { createServer, type Server } from 'node:http'
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client'
import type { MemberStatus } from '../../net/interfaces.ts'
import type { SwitchStatus } from '../../net/tunnel/interfaces.ts'
import type { MigrationReport } from '../../vm/migration/interfaces.ts'
import { MeshError } from '../base/errors.ts'
import type { Logger } from '../base/log.ts'
import { isLoopback, parseListenAddr } from '../config.ts'
import type { AgentService } from './interfaces.ts'

export { parseListenAddr } from '../config.ts'

import { pathLabel } from './path-label.ts'

export class MetricsError extends MeshError {}

/** What the metrics read at scrape time; every source may be absent (a service not started). */
export interface MetricsSources {
  members(): MemberStatus[]
  tunnel(): SwitchStatus | undefined
  chunks(): { wireBytesIn: number; wireBytesOut: number; rejectedBlocks: number } | undefined
  vms(): Promise<Array<{ status: string }>>
}

/** A migration session's state change (the migration service's onState events). */
export interface MigrationStateObservation {
  vm: string
  direction: 'out' | 'in'
  peer: string
  from: string
  to: string
  atMs: number
}

export interface AgentMetrics extends AgentService {
  readonly registry: Registry
  /** Feeds the phase histogram and the outcome counter. */
  observeState(e: MigrationStateObservation): void
  /** A move out that completed: downtime and bytes by the path it took. */
  observeReport(r: MigrationReport, path: string): void
  /** Where it listens once started (ADDR:PORT). */
  address(): string | undefined
}

/** Terminal session states and what they mean for the outcome label. */
const TERMINAL: Record<string, string> = {
  completed: 'completed',
  'rolled-back': 'rolled_back',
  'in-doubt': 'in_doubt',
  running: 'completed',
  discarded: 'discarded',
  failed: 'failed',
}

export function createAgentMetrics(init: {
  listen: string
  sources: MetricsSources
  log: Logger
}): AgentMetrics {
  const { host, port } = parseListenAddr(init.listen, '--metrics')
  const { sources, log } = init
  const registry = new Registry()
  collectDefaultMetrics({ register: registry })

  const members = new Gauge({
    name: 'mesh_members',
    help: 'Members of the network this agent knows, by state (self included).',
    labelNames: ['state'],
    registers: [registry],
    collect() {
      this.reset()
      for (const m of sources.members()) this.inc({ state: m.self ? 'self' : m.state })
    },
  })
  const links = new Gauge({
    name: 'mesh_links',
    help: 'Open links to other members, by path (ICE candidate type, +direct when bulk rides TCP).',
    labelNames: ['path'],
    registers: [registry],
    collect() {
      this.reset()
      for (const m of sources.members()) if (!m.self && m.link === 'open') this.inc({ path: pathLabel(m) })
    },
  })
  const rtt = new Gauge({
    name: 'mesh_link_rtt_seconds',
    help: 'Last measured round-trip time to each member (link heartbeat, else libp2p ping).',
    labelNames: ['peer', 'name', 'path'],
    registers: [registry],
    collect() {
      this.reset()
      for (const m of sources.members())
        if (!m.self && m.rttMs !== undefined)
          this.set({ peer: m.peerId, name: m.name, path: pathLabel(m) }, m.rttMs / 1000)
    },
  })
  const migrationDuration = new Histogram({
    name: 'mesh_migration_duration_seconds',
    help: 'Time a migration session spent in each phase (state), and in all (phase="total").',
    labelNames: ['direction', 'phase'],
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers: [registry],
  })
  const downtime = new Histogram({
    name: 'mesh_migration_downtime_seconds',
    help: 'Guest paused on the source until running on the destination, per completed move out.',
    buckets: [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [registry],
  })
  const migrations = new Counter({
    name: 'mesh_migrations_total',
    help: 'Migration sessions that ended, by direction and outcome.',
    labelNames: ['direction', 'outcome'],
    registers: [registry],
  })
  const migrationBytes = new Counter({
    name: 'mesh_migration_bytes_total',
    help: 'Bytes of completed moves out on the wire, by the path of the link to the destination.',
    labelNames: ['path'],
    registers: [registry],
  })
  const chunkBytes = new Counter({
    name: 'mesh_chunk_fetch_bytes_total',
    help: 'Bytes of the chunk exchange protocol on the wire, received (fetches) and sent (serving).',
    labelNames: ['direction'],
    registers: [registry],
    collect() {
      const s = sources.chunks()
      this.reset()
      if (s === undefined) return
      this.inc({ direction: 'in' }, s.wireBytesIn)
      this.inc({ direction: 'out' }, s.wireBytesOut)
    },
  })
  const chunkRejected = new Counter({
    name: 'mesh_chunk_rejected_blocks_total',
    help: 'Chunk blocks whose content did not match their hash (dropped; the sender is distrusted).',
    registers: [registry],
    collect() {
      this.reset()
      this.inc(sources.chunks()?.rejectedBlocks ?? 0)
    },
  })
  // Per-port counters of the switch, summed by port kind; remote ports also by the link's path.
  const tunnelPorts = () => {
    const st = sources.tunnel()
    const byPeer = new Map(sources.members().map((m) => [m.peerId, m]))
    return (st?.ports ?? []).map((p) => ({
      p,
      path: p.kind === 'remote' ? pathLabel(byPeer.get(p.detail ?? p.id)) : p.kind,
    }))
  }
  const tunnelFrames = new Counter({
    name: 'mesh_tunnel_frames_total',
    help: 'Ethernet frames through the tunnel switch, by port kind and direction (rx: from the port).',
    labelNames: ['kind', 'direction'],
    registers: [registry],
    collect() {
      this.reset()
      for (const { p } of tunnelPorts()) {
        this.inc({ kind: p.kind, direction: 'rx' }, p.rxFrames)
        this.inc({ kind: p.kind, direction: 'tx' }, p.txFrames)
      }
    },
  })
  const tunnelBytes = new Counter({
    name: 'mesh_tunnel_bytes_total',
    help: 'Bytes of Ethernet frames through the tunnel switch, by path (remote ports) or port kind.',
    labelNames: ['path', 'direction'],
    registers: [registry],
    collect() {
      this.reset()
      for (const { p, path } of tunnelPorts()) {
        this.inc({ path, direction: 'rx' }, p.rxBytes)
        this.inc({ path, direction: 'tx' }, p.txBytes)
      }
    },
  })
  const tunnelDrops = new Counter({
    name: 'mesh_tunnel_drops_total',
    help: 'Frames the tunnel dropped, by reason (switch-wide reasons, and port_KIND for full port queues).',
    labelNames: ['reason'],
    registers: [registry],
    collect() {
      this.reset()
      const st = sources.tunnel()
      for (const [reason, n] of Object.entries(st?.drops ?? {})) this.inc({ reason }, n)
      for (const { p } of tunnelPorts()) if (p.drops > 0) this.inc({ reason: `port_${p.kind}` }, p.drops)
    },
  })
  const vms = new Gauge({
    name: 'mesh_vms',
    help: 'VMs on this host by state.',
    labelNames: ['state'],
    registers: [registry],
    async collect() {
      const list = await sources.vms().catch(() => [])
      this.reset()
      for (const s of ['running', 'paused', 'exited']) this.set({ state: s }, 0)
      for (const v of list) this.inc({ state: v.status })
    },
  })
  void [members, links, rtt, chunkBytes, chunkRejected, tunnelFrames, tunnelBytes, tunnelDrops, vms]

  /** When each live session entered its current state, by `direction/vm`. */
  const entered = new Map<string, { state: string; at: number; start: number }>()
  let server: Server | undefined
  let bound: string | undefined

  return {
    name: 'metrics',
    registry,
    observeState(e) {
      const key = `${e.direction}/${e.vm}`
      const cur = entered.get(key)
      const start = cur?.start ?? e.atMs
      if (cur !== undefined && cur.state === e.from)
        migrationDuration.observe(
          { direction: e.direction, phase: e.from },
          Math.max(0, e.atMs - cur.at) / 1000,
        )
      const outcome = TERMINAL[e.to]
      if (outcome !== undefined) {
        entered.delete(key)
        migrations.inc({ direction: e.direction, outcome })
        migrationDuration.observe(
          { direction: e.direction, phase: 'total' },
          Math.max(0, e.atMs - start) / 1000,
        )
      } else entered.set(key, { state: e.to, at: e.atMs, start })
    },
    observeReport(r, path) {
      downtime.observe(r.downtimeMs / 1000)
      migrationBytes.inc({ path }, r.wireBytes)
    },
    address: () => bound,
    async start() {
      if (!isLoopback(host))
        log.warn('metrics are served on a non-loopback address, as asked', { listen: init.listen })
      const srv = createServer((req, res) => {
        if (req.method !== 'GET' || (req.url ?? '/').split('?')[0] !== '/metrics') {
          res.writeHead(404, { 'content-type': 'text/plain' }).end('see /metrics\n')
          return
        }
        registry.metrics().then(
          (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
          (err: unknown) => {
            log.warn('metrics collection failed', { error: String(err) })
            res.writeHead(500, { 'content-type': 'text/plain' }).end('collection failed\n')
          },
        )
      })
      await new Promise<void>((resolve, reject) => {
        srv.once('error', (err) =>
          reject(new MetricsError(`cannot serve metrics on ${init.listen}: ${err.message}`, { cause: err })),
        )
        srv.listen(port, host, () => resolve())
      })
      const a = srv.address()
      bound =
        typeof a === 'object' && a !== null
          ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`
          : init.listen
      server = srv
      log.info('metrics up', { url: `http://${bound}/metrics` })
    },
    async stop() {
      const srv = server
      server = undefined
      if (srv === undefined) return
      srv.closeAllConnections()
      await new Promise<void>((r) => srv.close(() => r()))
    },
    handlers: () => ({}),
    status: () => ({ listen: bound }),
  }
}
