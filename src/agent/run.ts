import { createHash } from 'node:crypto'
import { existsSync, readFileSync, statSync } from 'node:fs'
import { hostname } from 'node:os'
import { join } from 'node:path'
import type { ChunkService } from '../../net/chunks/exchange.ts'
import type { ImageRegistry } from '../../net/chunks/images.ts'
import type { ChunkStore } from '../../net/chunks/interfaces.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import type { IceServer } from '../../net/interfaces.ts'
import { loadNetworkKey, type NetworkKey } from '../../net/membership/network.ts'
import { knownBootstrap, NETWORK_STATE_FILE } from '../../net/node.ts'
import { STUN_DEFAULT_PORT } from '../../net/stun/server.ts'
import { TUNNEL_MTU } from '../../net/tunnel/interfaces.ts'
import { type LinkEngine, linkFactoryFor } from '../../net/webrtc/link.ts'
import { previousDisksBudget, prunePreviousDisks, sweepIncomingDisks } from '../../vm/disk/housekeeping.ts'
import { VmStateError } from '../../vm/errors.ts'
import { createStoreRamCache } from '../../vm/migration/cache.ts'
import type { RamCache } from '../../vm/migration/interfaces.ts'
import { createManagerHost } from '../../vm/migration/manager-host.ts'
import { overlayMigrationNetwork } from '../../vm/migration/overlay.ts'
import { sweepIncoming } from '../../vm/migration/sweep.ts'
import { postcopySupport } from '../../vm/postcopy/pager.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import type { VmSpec } from '../../vm/spec.ts'
import { createCgroupThrottle, sweepThrottles } from '../../vm/throttle/cgroup.ts'
import { MeshError, UsageError } from '../base/errors.ts'
import { createLogger, type Logger } from '../base/log.ts'
import { NETWORK_KEY_FILE, statePaths } from '../config.ts'
import { type Agent, createAgent } from './agent.ts'
import { createAgentCalls } from './calls/calls.ts'
import type { AgentService } from './interfaces.ts'
import type { AgentMetrics } from './metrics.ts'
import { createNetService, stunFromBootstrap } from './net-service.ts'
import { pathLabel } from './path-label.ts'
import { createChunkAgentService } from './services/chunks.ts'
import { createDirectoryService } from './services/directory.ts'
import { createMigrationService } from './services/migration.ts'
import { createTunnelService } from './services/tunnel.ts'
import { createLocalVmManager, createVmService, runDirFor } from './services/vm.ts'
import { defaultOffered, type SpotOptions } from './spot/options.ts'
import { createSpotService } from './spot/service.ts'
import { createRamIndex, ramServingStore } from './spot/standby.ts'
import { createWatcher } from './spot/watchers.ts'
import { plugVmsIntoTunnel } from './vm-tunnel.ts'
import type { WebView } from './web.ts'

export { NETWORK_KEY_FILE }

export interface AgentOptions {
  state: string
  name?: string
  listen?: string[]
  announce?: string[]
  /** Serve circuit relay and STUN for other members. */
  bootstrap?: boolean
  stunPort?: number
  /** Extra ICE servers: stun:HOST:PORT or turn:HOST:PORT URLs. */
  ice?: string[]
  /** File holding `user:password` for the TURN servers (never on the command line). */
  turnCredentials?: string
  invite?: string
  pnet?: boolean
  /** WebRTC implementation for links (default werift). */
  engine?: LinkEngine
  /** Move bulk channels onto a direct libp2p connection when one is possible (default true). */
  direct?: boolean
  /** ... or onto the bootstrap's relayed TCP connection when nothing direct works (default true). */
  relayBulk?: boolean
  /** TCP congestion control of the agent's sockets (default 'bbr'; false: the kernel's default). */
  tcpCongestion?: string | false
  /** Members kept linked at all times (ring neighbours); the others get links on demand (default 8). */
  warmLinks?: number
  /** Host TAP port into the tunnel, so host processes reach guests (`--tap NAME --address CIDR`). */
  tap?: { name: string; address: string }
  /** Spot notices, labels and the room offered to VMs (`--spot`, `--label`, `--capacity`). */
  spot?: SpotOptions
  /** Serve Prometheus metrics on this ADDR:PORT (src/agent/metrics.ts). */
  metrics?: string
  /** Serve the live web view on this ADDR:PORT (src/agent/web.ts). */
  web?: string
}

/** Where an agent's guest RAM files live: tmpfs, one directory per agent (state dir). */
export function ramDirFor(stateDir: string, env: NodeJS.ProcessEnv = process.env): string {
  const id = createHash('sha256').update(statePaths(stateDir).dir).digest('hex').slice(0, 12)
  return env.MESH_RAM_DIR ?? `/dev/shm/mesh/${id}`
}

/** The chunk store exists only once its service started; the migration service is built before. */
function lazyRamCache(make: () => RamCache): RamCache {
  let cache: RamCache | undefined
  const get = () => {
    cache ??= make()
    return cache
  }
  return {
    has: (hash) => get().has(hash),
    get: (hash) => get().get(hash),
    remember: (vm, path, chunkSize, options) => get().remember(vm, path, chunkSize, options),
    settled: (vm) => get().settled(vm),
    forget: (vm) => get().forget(vm),
  }
}

/** A local file for an image reference: the registry's copy, pulled from the members when missing. */
async function resolveImageFile(
  chunks: { images: ImageRegistry; service: ChunkService },
  ref: string,
  dir: string,
  signal?: AbortSignal,
): Promise<string> {
  if (chunks.images.get(ref) === undefined)
    await chunks.images.pull(chunks.service, ref, undefined, signal === undefined ? {} : { signal })
  return chunks.images.materialize(ref, { service: chunks.service, dir, ...(signal ? { signal } : {}) })
}

/** Guests' MTU must let one Ethernet frame fit one tunnel message (net/tunnel: no fragmentation). */
function withTunnelMtu(spec: VmSpec): VmSpec {
  const cmdline = spec.cmdline ?? ''
  if (/(^|\s)mesh\.mtu=/.test(cmdline)) return spec
  return { ...spec, cmdline: `${cmdline} mesh.mtu=${TUNNEL_MTU}`.trim() }
}

export class AgentConfigError extends MeshError {}

function readTurnCredentials(path: string): { username: string; credential: string } {
  let text: string
  try {
    if ((statSync(path).mode & 0o077) !== 0) {
      throw new AgentConfigError(`${path} is readable by others; chmod 600 it (it holds TURN credentials)`)
    }
    text = readFileSync(path, 'utf8').trim()
  } catch (err) {
    if (err instanceof AgentConfigError) throw err
    throw new AgentConfigError(`cannot read TURN credentials from ${path}: ${(err as Error).message}`, {
      cause: err,
    })
  }
  const i = text.indexOf(':')
  if (i <= 0) throw new AgentConfigError(`${path} must hold 'user:password' on one line`)
  return { username: text.slice(0, i), credential: text.slice(i + 1) }
}

function iceServers(opts: AgentOptions, bootstrapAddrs: string[]): IceServer[] {
  const servers: IceServer[] = stunFromBootstrap(bootstrapAddrs)
  const creds = opts.turnCredentials === undefined ? undefined : readTurnCredentials(opts.turnCredentials)
  for (const url of opts.ice ?? []) {
    if (!/^(stun|turn):[^\s]+$/.test(url)) throw new UsageError(`--ice '${url}' must be a stun: or turn: URL`)
    if (url.startsWith('turn:')) {
      if (creds === undefined) throw new UsageError(`--ice ${url} needs --turn-credentials FILE`)
      servers.push({ urls: url, ...creds })
    } else servers.push({ urls: url })
  }
  return servers
}

/**
 * Parts a caller may swap in the agent's composition. Tests run the real agent with one part changed
 * (test/helpers/forger-agent.ts: a store whose reads are forged) instead of composing a copy of it.
 */
export interface AgentParts {
  /** Wraps the chunk store the chunk service opens (below the standby RAM index's wrapper). */
  wrapChunkStore?: (store: ChunkStore) => ChunkStore
}

/** Builds the agent for a state dir: the overlay node plus every service hosted next to it. */
export async function buildAgent(
  opts: AgentOptions,
  log: Logger = createLogger(),
  parts: AgentParts = {},
): Promise<Agent> {
  const paths = statePaths(opts.state)
  const keyFile = join(paths.dir, NETWORK_KEY_FILE)
  let networkKey: NetworkKey | undefined
  if (existsSync(keyFile)) networkKey = await loadNetworkKey(keyFile)
  if (
    networkKey === undefined &&
    opts.invite === undefined &&
    !existsSync(join(paths.dir, NETWORK_STATE_FILE))
  ) {
    throw new AgentConfigError(
      `${paths.dir} has no network: run 'mesh join INVITE' on a new node, or 'mesh network create NAME' on the first one`,
    )
  }
  const bootstrapRole = opts.bootstrap === true
  const nodeName =
    opts.name ??
    hostname()
      .replace(/[^A-Za-z0-9._-]/g, '-')
      .slice(0, 63)
  const net = createNetService({
    stateDir: paths.dir,
    name: nodeName,
    listen: opts.listen ?? [bootstrapRole ? '/ip4/0.0.0.0/tcp/4001' : '/ip4/0.0.0.0/tcp/0'],
    ...(opts.announce === undefined ? {} : { announce: opts.announce }),
    ...(bootstrapRole
      ? { bootstrapRole: { relay: true, stunPort: opts.stunPort ?? STUN_DEFAULT_PORT } }
      : {}),
    ...(networkKey === undefined ? {} : { networkKey }),
    ...(opts.invite === undefined ? {} : { invite: opts.invite }),
    iceServers: iceServers(opts, await knownBootstrap(paths.dir, opts.invite)),
    pnet: opts.pnet ?? false,
    direct: opts.direct ?? true,
    relayBulk: opts.relayBulk ?? true,
    ...(opts.tcpCongestion === undefined ? {} : { tcpCongestion: opts.tcpCongestion }),
    ...(opts.warmLinks === undefined ? {} : { links: { warm: opts.warmLinks } }),
    ...(opts.engine === undefined ? {} : { linkFactory: linkFactoryFor(opts.engine) }),
    log: log.child('net'),
  })
  const directory = createDirectoryService({
    node: net.node,
    local: () => manager.list(),
    // members' `mesh vm stop/console` for the VMs of this host (vm.stop-remote on their agent)
    vms: { stop: (name) => manager.stop(name), console: (name, lines) => manager.console(name, lines) },
    calls: () => calls,
    // members' `mesh vm set` for the VMs of this host (vm.set-remote on their agent)
    spotSet: (p) => spot.handlers()['spot.set'](p, { emit: () => {}, signal: new AbortController().signal }),
    log: log.child('directory'),
  })
  // The chunk service also serves the RAM of VMs that have a warm standby (spot/standby.ts).
  const ramIndex = createRamIndex()
  const chunks = createChunkAgentService({
    stateDir: paths.dir,
    overlay: () => net.node.overlay,
    log: log.child('chunks'),
    openStore: async (o) => {
      const store = await openChunkStore(o)
      return ramServingStore(parts.wrapChunkStore?.(store) ?? store, ramIndex)
    },
  })
  const tunnel = createTunnelService({
    overlay: net.node.overlay,
    log: log.child('tunnel'),
    ...(opts.tap === undefined ? {} : { tap: opts.tap }),
    // Any VM of the mesh, by name: this host's first, else whoever runs it (net/directory).
    resolveVm: async (vm) => (await directory.where(vm))?.entry.ip?.split('/')[0],
  })

  // One driver per agent; its RAM files live in a directory of their own so that several agents on
  // one machine (tests, the demo) never collide on a VM's name.
  const ramDir = ramDirFor(paths.dir)
  const driver = createQemuDriver({
    runDir: runDirFor(paths.dir),
    ramDir,
    diskDir: join(paths.dir, 'disks'),
    // `image:NAME[:TAG]` in a spec (a disk's base, a kernel): a file assembled from the chunk store,
    // pulled from the members first when this host does not hold the image (a migration's destination
    // gets a VM's base this way; chunks it already holds are not fetched again).
    resolveImage: (ref, signal) =>
      resolveImageFile(chunks, ref.slice('image:'.length), join(paths.dir, 'files'), signal),
  })
  const manager = createLocalVmManager(paths.dir, driver)
  const run = manager.run.bind(manager)
  // The spot service refuses VMs on a host that drains, is under a notice, or has no room left.
  manager.run = (spec, signal) => {
    spot.admit(spec)
    return run(withTunnelMtu(spec), signal)
  }
  const vms = createVmService({ manager, log: log.child('vm') })
  const managerHost = await createManagerHost({ manager, driver, ramDir, stateDir: paths.dir })
  const plugged = plugVmsIntoTunnel(manager, driver, managerHost, () => tunnel)
  const host: typeof plugged = {
    ...plugged,
    allocateRam: (spec, signal) => {
      spot.admit(spec)
      return plugged.allocateRam(spec, signal)
    },
  }
  const calls = createAgentCalls({
    overlay: () => net.node.overlay,
    isMember: (peer) => net.node.members().some((m) => m.peerId === peer),
    log: log.child('calls'),
  })
  const spotOpts = opts.spot ?? { labels: {} }
  const spotLog = log.child('spot')
  const spot = createSpotService({
    stateDir: paths.dir,
    log: spotLog,
    calls,
    self: () => ({ peer: net.node.peerId, name: nodeName }),
    members: () => net.node.members(),
    vms: async () =>
      (await manager.list()).map((v) => {
        let gib = 0
        try {
          gib = manager.get(v.name).spec.volume?.sizeGiB ?? 0
        } catch {
          // Gone meanwhile: no disk to count.
        }
        return { ...v, diskBytes: gib * 2 ** 30 }
      }),
    // An evacuation's deadline is the host's death: a move the estimate says will miss it still goes
    // (#15's deadline refusal would leave the VM on a host that is about to disappear).
    migrate: (p, o) => migration.migrate({ ...p, bestEffort: true }, o),
    labels: spotOpts.labels,
    offered: defaultOffered(spotOpts.offered, paths.dir),
    ...(spotOpts.source === undefined
      ? {}
      : {
          watcher: createWatcher(spotOpts.source, {
            ...(spotOpts.pollMs === undefined ? {} : { pollMs: spotOpts.pollMs }),
            ...(spotOpts.windowMs === undefined ? {} : { windowMs: spotOpts.windowMs }),
            log: spotLog,
          }),
        }),
    standby: {
      index: ramIndex,
      chunks: () => ({ service: chunks.service, store: chunks.store }),
      ramPath: async (vm) => {
        const v = (await manager.list()).find((x) => x.name === vm)
        return v !== undefined && (v.status === 'running' || v.status === 'paused') ? v.memoryPath : undefined
      },
      disk: (vm) => {
        try {
          // The migration's chunk size: the standby's disk chunks are the ones a move's DiskReceiver looks up.
          return manager.get(vm).standbyDisk?.(64 * 1024)
        } catch (err) {
          // It stopped or left meanwhile: no disk to read.
          if (err instanceof VmStateError) return undefined
          throw err
        }
      },
    },
    ...(spotOpts.marginMs === undefined ? {} : { marginMs: spotOpts.marginMs }),
    ...(spotOpts.onRebalance === undefined ? {} : { onRebalance: spotOpts.onRebalance }),
  })
  // Metrics read the other services at scrape time; migrations reach them as events.
  let metrics: AgentMetrics | undefined
  if (opts.metrics !== undefined) {
    const { createAgentMetrics } = await import('./metrics.ts')
    metrics = createAgentMetrics({
      listen: opts.metrics,
      log: log.child('metrics'),
      sources: {
        members: () => net.node.members(),
        tunnel: () => tunnel.switch.status(),
        chunks: () => {
          try {
            return chunks.service.stats()
          } catch {
            return undefined // not started (yet)
          }
        },
        vms: () => manager.list(),
      },
    })
  }
  let web: WebView | undefined
  if (opts.web !== undefined) {
    const { createWebView } = await import('./web.ts')
    web = createWebView({
      listen: opts.web,
      stateDir: paths.dir,
      log: log.child('web'),
      sources: {
        self: () => ({ peerId: net.node.peerId, name: nodeName }),
        members: () => net.node.members(),
        tunnel: () => tunnel.switch.status(),
        vms: () => directory.all(),
      },
    })
  }
  const linkPath = (peer: string) => pathLabel(net.node.members().find((m) => m.peerId === peer))
  const migration = createMigrationService({
    network: overlayMigrationNetwork(() => net.node.overlay),
    host,
    cache: lazyRamCache(() => createStoreRamCache(chunks.store)),
    log: log.child('migrate'),
    isMember: (peer) => net.node.members().some((m) => m.peerId === peer),
    resolvePeer: (ref) => net.resolvePeer(ref).peerId,
    // `mesh migrate VM` from a member with no link to the VM's host (meshes beyond the warm set)
    findHost: async (vm, signal) => {
      const loc = await directory.where(vm, signal)
      return loc === undefined || loc.here ? undefined : loc.peer
    },
    onState: (e) => {
      metrics?.observeState(e)
      web?.observeState(e)
    },
    onProgress: web === undefined ? undefined : (p) => web?.observeProgress(p),
    onReport: (r) => {
      metrics?.observeReport(r, linkPath(r.to))
      web?.observeReport(r)
    },
    nameOf: (peer) => net.node.members({ includeDropped: true }).find((m) => m.peerId === peer)?.name ?? peer,
    // #15: vCPU throttling (cgroup CPU bandwidth) for pre-copy, post-copy paging (userfaultfd).
    throttle: createCgroupThrottle(),
    postcopy: async () => (await postcopySupport()).ok,
  })
  // After the VM manager re-adopted its VMs: kill incoming QEMUs a killed agent left behind, except
  // those of moves this host committed to (the migration service re-adopts them when it starts).
  const sweep: AgentService = {
    name: 'sweep',
    async start() {
      const inUse = new Set([
        ...(await manager.list()).map((v) => v.memoryPath),
        ...managerHost.ledger.incoming().map((r) => r.handle.memoryPath),
      ])
      const r = await sweepIncoming(ramDir, inUse)
      if (Object.values(r).some((v) => Array.isArray(v) && v.length > 0))
        log.info('swept leftovers', { ...r })
      // Then the disks of those incoming moves, and previous disks over their budget (vm/disk).
      const disks = join(paths.dir, 'disks')
      const vmDisks = (await manager.list()).flatMap((v) =>
        v.volumePath === undefined ? [] : [v.volumePath],
      )
      const swept = await sweepIncomingDisks(disks, new Set(vmDisks))
      const pruned = await prunePreviousDisks(disks, await previousDisksBudget(disks))
      if (swept.removed.length + swept.kept.length + pruned.length > 0)
        log.info('swept disk leftovers', {
          removed: swept.removed,
          keptAsPrevious: swept.kept,
          prunedPrevious: pruned.map((d) => d.path),
        })
      // A guest must not stay throttled after the move that throttled it died with the agent.
      const pids = new Set((await manager.list()).flatMap((v) => (v.pid === undefined ? [] : [v.pid])))
      const lifted = await sweepThrottles(pids).catch(() => 0)
      if (lifted > 0) log.info('lifted vCPU throttles a killed agent left', { count: lifted })
    },
    async stop() {},
    handlers: () => ({}),
  }
  const services: AgentService[] = [net, calls, directory, chunks, tunnel, vms, sweep, migration, spot]
  if (metrics !== undefined) services.push(metrics)
  if (web !== undefined) services.push(web)
  const agent = createAgent({ stateDir: paths.dir, services, log })
  // A revoked node can do nothing useful: say so once, clearly, and stop with a failure status.
  net.node.on('self-revoked', (e) => {
    log.error('this node was revoked from the network; stopping', { network: e.network })
    process.exitCode = 1
    void agent.stop()
  })
  return agent
}

/** Runs an agent in the foreground until SIGINT/SIGTERM or `agent.stop`. */
export async function runAgent(opts: AgentOptions): Promise<void> {
  const log = createLogger()
  const agent = await buildAgent(opts, log)
  const stop = () => {
    log.info('stopping (signal)')
    void agent.stop()
  }
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
  try {
    await agent.start()
    await agent.wait()
  } finally {
    process.off('SIGINT', stop)
    process.off('SIGTERM', stop)
  }
}
