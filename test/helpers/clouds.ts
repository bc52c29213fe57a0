/**
 * The "clouds" test fixture: an internet and K NAT'd clouds built from network namespaces, so that the
 * overlay can be tested across real NATs on one machine (needs root, iproute2, nftables or iptables).
 *
 *   internet ns ── bridge br0 (198.51.100.0/24, no forwarding, no default routes)
 *     ├─ internet hosts: one ns each, eth0 = 198.51.100.100+j
 *     └─ cloud routers: one ns each, wan0 = 198.51.100.10+i (the cloud's public address)
 *          └─ bridge lan0 = 10.(i+1).0.1/24 inside the router ns, NAT onto wan0
 *               └─ cloud hosts: one ns each, eth0 = 10.(i+1).0.10+k, default route via the router
 *
 * Nothing has a route to another cloud's 10.x LAN: internet hosts and routers only know the internet
 * subnet and their own LAN, and only routers forward. So a packet between clouds must go through both
 * NATs, which is the situation the overlay has to cope with.
 *
 * NAT types: `cone` is plain masquerade: Linux keeps the source port when it can, so one socket gets
 * the same public port towards every destination (endpoint-independent mapping; filtering stays
 * endpoint-dependent, i.e. a port-restricted cone). `symmetric` is masquerade with random,fully-random:
 * every new flow (per destination address and port) gets a random public port, which defeats hole
 * punching and forces a relay.
 *
 * Cleanup: destroy() kills every process started through the fixture (whole process group, SIGTERM
 * then SIGKILL) and every other process found inside the topology's namespaces, then deletes the
 * namespaces (which removes their veths and bridges). It is idempotent. Live topologies are also torn
 * down synchronously on process exit and on SIGINT/SIGTERM/SIGHUP, and createClouds() first sweeps
 * namespaces left behind by an earlier run that was SIGKILLed (their owner pid is dead).
 */
import { type ChildProcess, type SpawnOptions, spawn } from 'node:child_process'
import { readFileSync, writeFileSync } from 'node:fs'
import { StringDecoder } from 'node:string_decoder'
import { AbortError, MeshError, throwIfAborted } from '../../src/errors.ts'
import {
  deleteNetns,
  deleteNetnsSync,
  type ExecOptions,
  type ExecResult,
  execCommand,
  ipBatch,
  killNetnsProcesses,
  killNetnsProcessesSync,
  killProcessGroup,
  listNetns,
  NetnsError,
  pidAlive,
  runChecked,
  sleep,
} from './netns.ts'
import { hasCommand } from './prereq.ts'

export type { ExecOptions, ExecResult } from './netns.ts'

/** The fixture was asked for something impossible, or building/tearing down the topology failed. */
export class CloudsError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CLOUDS' })
  }
}

export type NatType = 'cone' | 'symmetric'
export type Firewall = 'nft' | 'iptables'

export interface CloudSpec {
  /** Letters, digits, underscore; unique among clouds. */
  name: string
  nat?: NatType
  /** How many hosts (named `<cloud>1`, `<cloud>2`, …) or their names. Default 1. */
  hosts?: number | string[]
}

export interface TopologyOptions {
  clouds: CloudSpec[]
  /** Hosts directly on the internet bridge (bootstrap, STUN/TURN server, clients). */
  internetHosts?: string[]
  /** Cancels the construction (the partial topology is removed); has no effect once built. */
  signal?: AbortSignal
  /**
   * Wanted net.core.rmem_max/wmem_max (default 4 MiB: werift drops packets at the 208 KiB default).
   * Set per namespace when the kernel allows it; otherwise the host-wide value is raised (never
   * lowered). The value in effect is `Topology.udpBufferMax`. Sockets still have to ask for it
   * (SO_RCVBUF, e.g. dgram's `recvBufferSize`).
   */
  udpBufferBytes?: number
  /** How long destroy() waits after SIGTERM before SIGKILL. Default 2000 ms. */
  killGraceMs?: number
  /** NAT/filter tool in the routers. Default: nft when installed, else iptables. */
  firewall?: Firewall
  /** Keep IPv6 on (link-local addresses only). Default false: IPv4 only, so ICE candidates are simple. */
  ipv6?: boolean
}

export type HostSpawnOptions = Omit<SpawnOptions, 'detached'>

export interface Host {
  /** Unique across the topology; routers are named `<cloud>-router`. */
  name: string
  /** The network namespace's name (for `ip netns exec`). */
  ns: string
  /** Its address: private for cloud hosts, public for internet hosts and routers (their wan0). */
  ip: string
  /** The cloud it belongs to; undefined for internet hosts. */
  cloud?: string
  /** Runs a command to completion inside the namespace; a non-zero exit is returned, not thrown. */
  exec(cmd: string, args?: string[], opts?: ExecOptions): Promise<ExecResult>
  /** Like exec, but a non-zero exit throws CloudsError with the command's stderr. */
  run(cmd: string, args?: string[], opts?: ExecOptions): Promise<ExecResult>
  /**
   * Starts a long-running command inside the namespace as the leader of its own process group.
   * Tracked: destroy() kills its whole group. Its output is read and kept (see waitForLine), so an
   * unread pipe never blocks it.
   */
  spawn(cmd: string, args?: string[], opts?: HostSpawnOptions): ChildProcess
}

export interface Cloud {
  name: string
  nat: NatType
  /** The router's address on the internet: what the cloud's hosts look like from outside. */
  publicIp: string
  /** e.g. 10.1.0.0/24 */
  lanCidr: string
  router: Host
  hosts: Host[]
  /** Drops all traffic forwarded between the LAN and the internet (a link cut). Idempotent. */
  cut(): Promise<void>
  /** Undoes cut(). Existing NAT mappings survive a cut that is shorter than conntrack's timeouts. */
  restore(): Promise<void>
  readonly isCut: boolean
  /**
   * Forwards TCP `port` on the router's public address to the same port of `host` (default: the
   * cloud's first host): a cloud VM with a public IP and an open security-group port. Returns the
   * public multiaddr (`/ip4/PUBLIC/tcp/PORT`) to announce.
   */
  forwardTcp(port: number, host?: Host): Promise<string>
}

export interface Topology {
  /** Run-unique prefix of every namespace name, `mt<pid>t<n>-`. */
  prefix: string
  internet: { ns: string; cidr: string; hosts: Host[] }
  clouds: Cloud[]
  firewall: Firewall
  /** net.core.rmem_max/wmem_max in effect inside the namespaces (bytes). */
  udpBufferMax: number
  /** Any host, internet host or router by name; throws CloudsError for unknown names. */
  host(name: string): Host
  cloud(name: string): Cloud
  /** Every namespace this topology created (and has not deleted yet). */
  namespaces(): string[]
  /** Processes started through Host.spawn/exec that are still running. */
  processes(): ChildProcess[]
  readonly destroyed: boolean
  /** Kills everything and deletes every namespace. Idempotent; safe to call concurrently. */
  destroy(): Promise<void>
}

const INTERNET_NET = '198.51.100'
const INTERNET_CIDR = `${INTERNET_NET}.0/24`
const MAX_CLOUDS = 90 // routers are .10–.99
const MAX_INTERNET_HOSTS = 150 // internet hosts are .100–.249
const MAX_CLOUD_HOSTS = 240 // cloud hosts are .10–.249
const NAME_RE = /^[A-Za-z][A-Za-z0-9_]{0,23}$/
const PREFIX_RE = /^mt(\d+)t\d+-/
const DEFAULT_UDP_BUFFER = 4 * 1024 * 1024

// ---------------------------------------------------------------------------------------------------
// Output capture: waitForLine must see lines printed before it was called (a server's "listening"
// line often comes before the test gets to wait for it), so spawn() starts recording at once.

interface LineLog {
  lines: string[]
  listeners: Set<() => void>
  ended: boolean
}
const MAX_LINES = 10_000
const lineLogs = new WeakMap<ChildProcess, LineLog>()

function recordLines(child: ChildProcess): LineLog {
  const existing = lineLogs.get(child)
  if (existing !== undefined) return existing
  const log: LineLog = { lines: [], listeners: new Set(), ended: false }
  lineLogs.set(child, log)
  const notify = (): void => {
    for (const l of [...log.listeners]) l()
  }
  let open = 0
  for (const stream of [child.stdout, child.stderr]) {
    if (stream === null) continue
    open++
    const decoder = new StringDecoder('utf8')
    let partial = ''
    const push = (text: string): void => {
      const parts = (partial + text).split('\n')
      partial = parts.pop() ?? ''
      if (parts.length === 0) return
      log.lines.push(...parts)
      if (log.lines.length > MAX_LINES) log.lines.splice(0, log.lines.length - MAX_LINES)
      notify()
    }
    stream.on('data', (b: Buffer) => push(decoder.write(b)))
    stream.on('end', () => {
      push(`${decoder.end()}`)
      if (partial !== '') {
        log.lines.push(partial)
        partial = ''
      }
      if (--open === 0) {
        log.ended = true
      }
      notify()
    })
  }
  if (open === 0) log.ended = true
  // A failed spawn (no such command) ends the output too, so waiters fail at once with the reason.
  child.once('error', (e) => {
    log.lines.push(`spawn error: ${e.message}`)
    log.ended = true
    notify()
  })
  return log
}

/** Every line the child has printed so far (stdout and stderr interleaved; the last 10 000 lines). */
export function outputLines(child: ChildProcess): string[] {
  return recordLines(child).lines
}

/**
 * Resolves with the first line (stdout or stderr, since the child started when it was spawned through
 * Host.spawn) that matches `re`. Rejects with CloudsError on timeout, or when the child's output ends
 * without a match, with the last lines of output in the message.
 */
export function waitForLine(
  child: ChildProcess,
  re: RegExp,
  timeoutMs: number,
  signal?: AbortSignal,
): Promise<RegExpMatchArray> {
  const log = recordLines(child)
  return new Promise((resolve, reject) => {
    let checked = 0
    const tail = (): string => log.lines.slice(-5).join(' | ')
    const cleanup = (): void => {
      clearTimeout(timer)
      log.listeners.delete(check)
      signal?.removeEventListener('abort', onAbort)
    }
    const check = (): void => {
      // Lines can be dropped from the front once the cap is hit; never index past the end.
      if (checked > log.lines.length) checked = 0
      for (; checked < log.lines.length; checked++) {
        const m = log.lines[checked]!.match(re)
        if (m !== null) {
          cleanup()
          resolve(m)
          return
        }
      }
      if (log.ended) {
        cleanup()
        reject(new CloudsError(`process ${child.pid} ended without printing ${re}; last output: ${tail()}`))
      }
    }
    const onAbort = (): void => {
      cleanup()
      reject(new AbortError('waitForLine aborted', { cause: signal?.reason }))
    }
    const timer = setTimeout(() => {
      cleanup()
      reject(
        new CloudsError(
          `no line matching ${re} from process ${child.pid} within ${timeoutMs} ms; last output: ${tail()}`,
        ),
      )
    }, timeoutMs)
    if (signal?.aborted === true) {
      onAbort()
      return
    }
    signal?.addEventListener('abort', onAbort, { once: true })
    log.listeners.add(check)
    check()
  })
}

/** Resolves when the child has exited (immediately if it already has). */
export function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (!isRunning(child)) return Promise.resolve(true)
  return new Promise((resolve) => {
    const done = (ok: boolean): void => {
      clearTimeout(timer)
      child.removeListener('exit', onExit)
      resolve(ok)
    }
    const onExit = (): void => done(true)
    const timer = setTimeout(() => done(false), timeoutMs)
    child.once('exit', onExit)
  })
}

function isRunning(child: ChildProcess): boolean {
  return child.pid !== undefined && child.exitCode === null && child.signalCode === null
}

// ---------------------------------------------------------------------------------------------------
// Registry of live topologies, torn down synchronously when the process ends.

const live = new Set<TopologyImpl>()
let handlersInstalled = false
let seq = 0

function installExitHandlers(): void {
  if (handlersInstalled) return
  handlersInstalled = true
  process.on('exit', destroyAllSync)
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const handler = (): void => {
      destroyAllSync()
      // Installing a listener removed Node's default "die on this signal". If nobody else (mocha)
      // handles it, restore the default and re-raise, so the process still ends as it would have.
      if (process.listenerCount(sig) === 1) {
        process.removeListener(sig, handler)
        handlersInstalled = false
        process.kill(process.pid, sig)
      }
    }
    process.on(sig, handler)
  }
}

/** Tears down every live topology of this process, synchronously (for exit and signal handlers). */
export function destroyAllSync(): void {
  for (const t of [...live]) t.destroySync()
}

/**
 * Removes namespaces that an earlier run of the fixture left behind because it was SIGKILLed: names
 * `mt<pid>t<n>-*` whose pid is no longer alive. Kills whatever still runs in them. Returns the names
 * removed. Topologies of other live processes (tests running in parallel) are left alone.
 */
export function sweepStale(): string[] {
  const removed: string[] = []
  for (const ns of listNetns()) {
    const m = PREFIX_RE.exec(ns)
    if (m === null) continue
    const pid = Number(m[1])
    if (pid === process.pid || pidAlive(pid)) continue
    killNetnsProcessesSync(ns)
    deleteNetnsSync(ns)
    removed.push(ns)
  }
  return removed
}

// ---------------------------------------------------------------------------------------------------

class HostImpl implements Host {
  constructor(
    private readonly topo: TopologyImpl,
    readonly name: string,
    readonly ns: string,
    readonly ip: string,
    readonly cloud?: string,
  ) {}

  async exec(cmd: string, args: string[] = [], opts: ExecOptions = {}): Promise<ExecResult> {
    this.topo.assertOpen()
    return execCommand('ip', ['netns', 'exec', this.ns, cmd, ...args], opts, (c) => this.topo.track(c))
  }

  async run(cmd: string, args: string[] = [], opts: ExecOptions = {}): Promise<ExecResult> {
    const r = await this.exec(cmd, args, opts)
    if (r.code !== 0) {
      const detail = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-3).join(' | ')
      const why = r.timedOut ? `timed out after ${opts.timeoutMs} ms` : `exit ${r.code}`
      throw new CloudsError(`[${this.name}] ${cmd} ${args.join(' ')}: ${why}: ${detail}`)
    }
    return r
  }

  spawn(cmd: string, args: string[] = [], opts: HostSpawnOptions = {}): ChildProcess {
    this.topo.assertOpen()
    // detached: the command leads its own process group, so destroy() can kill its children as well.
    const child = spawn('ip', ['netns', 'exec', this.ns, cmd, ...args], { ...opts, detached: true })
    this.topo.track(child)
    recordLines(child)
    return child
  }
}

class CloudImpl implements Cloud {
  isCut = false
  constructor(
    private readonly topo: TopologyImpl,
    readonly name: string,
    readonly nat: NatType,
    readonly publicIp: string,
    readonly lanCidr: string,
    readonly router: Host,
    readonly hosts: Host[],
  ) {}

  async cut(): Promise<void> {
    this.topo.assertOpen()
    if (this.topo.firewall === 'nft') {
      await this.router.run('nft', ['-f', '-'], {
        input: [
          'flush chain inet meshcut forward',
          'add rule inet meshcut forward iifname "wan0" drop',
          'add rule inet meshcut forward oifname "wan0" drop',
          '',
        ].join('\n'),
      })
    } else {
      await this.router.run('iptables', ['-w', '5', '-F', 'MESHCUT'])
      await this.router.run('iptables', ['-w', '5', '-A', 'MESHCUT', '-i', 'wan0', '-j', 'DROP'])
      await this.router.run('iptables', ['-w', '5', '-A', 'MESHCUT', '-o', 'wan0', '-j', 'DROP'])
    }
    this.isCut = true
  }

  async forwardTcp(port: number, host: Host = this.hosts[0]!): Promise<string> {
    this.topo.assertOpen()
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new CloudsError(`bad port ${port}`)
    if (host.cloud !== this.name) throw new CloudsError(`${host.name} is not in cloud ${this.name}`)
    if (this.topo.firewall === 'nft') {
      await this.router.run('nft', ['-f', '-'], {
        input: [
          'table ip meshfwd {',
          '  chain prerouting {',
          '    type nat hook prerouting priority dstnat; policy accept;',
          '  }',
          '}',
          `add rule ip meshfwd prerouting iifname "wan0" tcp dport ${port} dnat to ${host.ip}:${port}`,
          '',
        ].join('\n'),
      })
    } else {
      await this.router.run('iptables', [
        ...['-w', '5', '-t', 'nat', '-A', 'PREROUTING', '-i', 'wan0', '-p', 'tcp'],
        ...['--dport', String(port), '-j', 'DNAT', '--to-destination', `${host.ip}:${port}`],
      ])
    }
    return `/ip4/${this.publicIp}/tcp/${port}`
  }

  async restore(): Promise<void> {
    this.topo.assertOpen()
    if (this.topo.firewall === 'nft') {
      await this.router.run('nft', ['flush', 'chain', 'inet', 'meshcut', 'forward'])
    } else {
      await this.router.run('iptables', ['-w', '5', '-F', 'MESHCUT'])
    }
    this.isCut = false
  }
}

class TopologyImpl implements Topology {
  readonly internet: { ns: string; cidr: string; hosts: Host[] }
  readonly clouds: CloudImpl[] = []
  udpBufferMax = 0
  private readonly nsList: string[] = []
  private readonly children = new Set<ChildProcess>()
  private destroying: Promise<void> | undefined
  private readonly byName = new Map<string, Host>()

  constructor(
    readonly prefix: string,
    readonly firewall: Firewall,
    private readonly killGraceMs: number,
  ) {
    this.internet = { ns: `${prefix}inet`, cidr: INTERNET_CIDR, hosts: [] }
  }

  get destroyed(): boolean {
    return this.destroying !== undefined
  }

  assertOpen(): void {
    if (this.destroying !== undefined) throw new CloudsError(`topology ${this.prefix} is destroyed`)
  }

  track(child: ChildProcess): void {
    this.children.add(child)
    child.once('exit', () => this.children.delete(child))
    // A spawn failure must not crash the test process through an unhandled 'error' event.
    child.on('error', () => {})
    if (this.destroying !== undefined && child.pid !== undefined) killProcessGroup(child.pid, 'SIGKILL')
  }

  addNamespace(ns: string): void {
    this.nsList.push(ns)
  }

  addHost(h: Host): void {
    this.byName.set(h.name, h)
  }

  host(name: string): Host {
    const h = this.byName.get(name)
    if (h === undefined) {
      throw new CloudsError(`no host '${name}' in topology (have: ${[...this.byName.keys()].join(', ')})`)
    }
    return h
  }

  cloud(name: string): Cloud {
    const c = this.clouds.find((x) => x.name === name)
    if (c === undefined) throw new CloudsError(`no cloud '${name}' in topology`)
    return c
  }

  namespaces(): string[] {
    return [...this.nsList]
  }

  processes(): ChildProcess[] {
    return [...this.children].filter(isRunning)
  }

  destroy(): Promise<void> {
    this.destroying ??= this.teardown()
    return this.destroying
  }

  private async teardown(): Promise<void> {
    const running = this.processes()
    for (const c of running) killProcessGroup(c.pid!, 'SIGTERM')
    // Processes that left their group (setsid daemons, things started by a tool inside the namespace)
    // are still found by their network namespace: `ip netns pids`.
    await Promise.all([
      ...this.nsList.map((ns) => killNetnsProcesses(ns, this.killGraceMs)),
      ...running.map((c) => waitForExit(c, this.killGraceMs)),
    ])
    for (const c of this.processes()) killProcessGroup(c.pid!, 'SIGKILL')
    for (const ns of this.nsList) killNetnsProcessesSync(ns)
    // Wait until Node has reaped them, so a pid check after destroy() sees them gone (not zombies).
    const unreaped = (await Promise.all(running.map((c) => waitForExit(c, 5000)))).filter((ok) => !ok)
    const errors: string[] = []
    if (unreaped.length > 0) errors.push(`${unreaped.length} process(es) did not exit after SIGKILL`)
    const results = await Promise.allSettled(this.nsList.map((ns) => deleteNetns(ns)))
    for (const r of results) if (r.status === 'rejected') errors.push(String(r.reason))
    const left = listNetns().filter((ns) => ns.startsWith(this.prefix))
    if (left.length === 0) this.nsList.length = 0
    live.delete(this)
    if (left.length > 0) errors.push(`namespaces left: ${left.join(', ')}`)
    if (errors.length > 0) throw new CloudsError(`destroying topology ${this.prefix}: ${errors.join('; ')}`)
  }

  /** Last-chance teardown for exit/signal handlers: no waiting, SIGKILL at once. */
  destroySync(): void {
    this.destroying ??= Promise.resolve()
    for (const c of this.processes()) killProcessGroup(c.pid!, 'SIGKILL')
    for (const ns of this.nsList) killNetnsProcessesSync(ns)
    for (const ns of this.nsList) deleteNetnsSync(ns)
    live.delete(this)
  }
}

// ---------------------------------------------------------------------------------------------------

interface PlannedCloud {
  spec: CloudSpec
  nat: NatType
  index: number
  ns: string
  publicIp: string
  lanNet: string
  hostNames: string[]
}

function plan(opts: TopologyOptions, prefix: string) {
  if (opts.clouds.length > MAX_CLOUDS) throw new CloudsError(`at most ${MAX_CLOUDS} clouds`)
  const internetHosts = opts.internetHosts ?? []
  if (internetHosts.length > MAX_INTERNET_HOSTS) {
    throw new CloudsError(`at most ${MAX_INTERNET_HOSTS} internet hosts`)
  }
  const seenClouds = new Set<string>()
  const seenHosts = new Set<string>()
  const checkHost = (name: string): void => {
    if (!NAME_RE.test(name)) {
      throw new CloudsError(`bad host name '${name}': use a letter, then letters, digits or _ (max 24)`)
    }
    if (seenHosts.has(name)) throw new CloudsError(`duplicate host name '${name}'`)
    seenHosts.add(name)
  }
  for (const name of internetHosts) checkHost(name)
  const clouds: PlannedCloud[] = opts.clouds.map((spec, index) => {
    if (!NAME_RE.test(spec.name)) {
      throw new CloudsError(`bad cloud name '${spec.name}': use a letter, then letters, digits or _ (max 24)`)
    }
    if (seenClouds.has(spec.name)) throw new CloudsError(`duplicate cloud name '${spec.name}'`)
    seenClouds.add(spec.name)
    const nat = spec.nat ?? 'cone'
    if (nat !== 'cone' && nat !== 'symmetric') throw new CloudsError(`bad NAT type '${String(nat)}'`)
    const hosts = spec.hosts ?? 1
    const hostNames =
      typeof hosts === 'number' ? Array.from({ length: hosts }, (_, k) => `${spec.name}${k + 1}`) : [...hosts]
    if (hostNames.length > MAX_CLOUD_HOSTS)
      throw new CloudsError(`at most ${MAX_CLOUD_HOSTS} hosts per cloud`)
    for (const h of hostNames) checkHost(h)
    return {
      spec,
      nat,
      index,
      ns: `${prefix}rt-${spec.name}`,
      publicIp: `${INTERNET_NET}.${10 + index}`,
      lanNet: `10.${index + 1}.0`,
      hostNames,
    }
  })
  return { clouds, internetHosts }
}

function natRules(firewall: Firewall, nat: NatType): { cmd: string; args: string[]; input?: string }[] {
  if (firewall === 'nft') {
    const masq = nat === 'symmetric' ? 'masquerade random,fully-random' : 'masquerade'
    const ruleset = [
      'table ip meshnat {',
      '  chain postrouting {',
      '    type nat hook postrouting priority srcnat; policy accept;',
      `    oifname "wan0" ${masq}`,
      '  }',
      '}',
      // A NAT box does not answer unsolicited packets. Without this, a hole-punching packet that
      // reaches the router before the LAN host has sent its own creates a conntrack entry for the
      // router itself on that public port; masquerade then has to pick ANOTHER port for the host's
      // outgoing flow, so its server-reflexive address stops being valid and punching fails. Dropping
      // at input leaves the entry unconfirmed, as a real NAT would.
      'table inet meshin {',
      '  chain input {',
      '    type filter hook input priority filter; policy accept;',
      '    iifname "wan0" ct state new drop',
      '  }',
      '}',
      // cut() fills this chain; it is separate so that restore() can simply flush it.
      'table inet meshcut {',
      '  chain forward {',
      '    type filter hook forward priority filter; policy accept;',
      '  }',
      '}',
      '',
    ].join('\n')
    return [{ cmd: 'nft', args: ['-f', '-'], input: ruleset }]
  }
  const masq = ['-w', '5', '-t', 'nat', '-A', 'POSTROUTING', '-o', 'wan0', '-j', 'MASQUERADE']
  if (nat === 'symmetric') masq.push('--random-fully')
  return [
    { cmd: 'iptables', args: masq },
    // See the nft rules: unsolicited packets to the router must not claim public ports.
    {
      cmd: 'iptables',
      args: ['-w', '5', '-A', 'INPUT', '-i', 'wan0', '-m', 'conntrack', '--ctstate', 'NEW', '-j', 'DROP'],
    },
    { cmd: 'iptables', args: ['-w', '5', '-N', 'MESHCUT'] },
    { cmd: 'iptables', args: ['-w', '5', '-A', 'FORWARD', '-j', 'MESHCUT'] },
  ]
}

/**
 * Builds the topology. On any failure (or abort) everything built so far is removed before the error
 * is thrown. Needs root.
 */
export async function createClouds(opts: TopologyOptions): Promise<Topology> {
  const { signal } = opts
  throwIfAborted(signal)
  const firewall: Firewall = opts.firewall ?? (hasCommand('nft') ? 'nft' : 'iptables')
  const prefix = `mt${process.pid}t${seq++}-`
  const planned = plan(opts, prefix)
  sweepStale()
  installExitHandlers()

  const topo = new TopologyImpl(prefix, firewall, opts.killGraceMs ?? 2000)
  live.add(topo)
  try {
    await build(topo, planned, opts)
  } catch (e) {
    await topo.destroy().catch(() => {})
    if (signal?.aborted === true) throw new AbortError('createClouds aborted', { cause: signal.reason })
    if (e instanceof MeshError) throw e
    throw new CloudsError(`building clouds topology failed: ${(e as Error).message}`, { cause: e })
  }
  return topo
}

async function build(topo: TopologyImpl, p: ReturnType<typeof plan>, opts: TopologyOptions): Promise<void> {
  const { signal } = opts
  const inet = topo.internet.ns
  const hostNs = (name: string): string => `${topo.prefix}h-${name}`

  // 1. All namespaces, in one ip process. Registered before creation so a failure cleans them up.
  const all = [
    inet,
    ...p.clouds.flatMap((c) => [c.ns, ...c.hostNames.map(hostNs)]),
    ...p.internetHosts.map(hostNs),
  ]
  for (const ns of all) topo.addNamespace(ns)
  await ipBatch(
    undefined,
    all.map((ns) => `netns add ${ns}`),
    signal,
  )

  // 2. sysctls before any interface exists, so new interfaces never get IPv6 addresses. ip_forward
  // only in routers: nothing else may route between the internet and a LAN.
  const routers = new Set(p.clouds.map((c) => c.ns))
  await Promise.all(
    all.map((ns) => {
      const keys: string[] = []
      if (opts.ipv6 !== true)
        keys.push('net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1')
      keys.push(`net.ipv4.ip_forward=${routers.has(ns) ? 1 : 0}`)
      return runChecked('ip', ['netns', 'exec', ns, 'sysctl', '-q', '-w', ...keys], {
        signal,
        timeoutMs: 30_000,
      })
    }),
  )
  topo.udpBufferMax = await ensureUdpBuffers(all, opts.udpBufferBytes ?? DEFAULT_UDP_BUFFER, signal)
  throwIfAborted(signal)

  // 3. Links. Each veth is created inside one namespace with its peer placed straight into the other,
  // so interface names only have to be unique per namespace (eth0 everywhere, short port names).
  const batches: Promise<void>[] = [
    ipBatch(inet, ['link set lo up', 'link add br0 type bridge', 'link set br0 up'], signal),
  ]
  const inetPorts: string[] = []
  const routerPorts = new Map<string, string[]>()
  for (const c of p.clouds) {
    const wanPeer = `r${c.index}`
    inetPorts.push(wanPeer)
    batches.push(
      ipBatch(
        c.ns,
        [
          'link set lo up',
          'link add lan0 type bridge',
          `addr add ${c.lanNet}.1/24 dev lan0`,
          'link set lan0 up',
          `link add wan0 type veth peer name ${wanPeer} netns ${inet}`,
          `addr add ${c.publicIp}/24 dev wan0`,
          'link set wan0 up',
        ],
        signal,
      ),
    )
    const ports: string[] = []
    c.hostNames.forEach((name, k) => {
      const port = `p${k}`
      ports.push(port)
      batches.push(
        ipBatch(
          hostNs(name),
          [
            'link set lo up',
            `link add eth0 type veth peer name ${port} netns ${c.ns}`,
            `addr add ${c.lanNet}.${10 + k}/24 dev eth0`,
            'link set eth0 up',
            `route add default via ${c.lanNet}.1`,
          ],
          signal,
        ),
      )
    })
    routerPorts.set(c.ns, ports)
  }
  p.internetHosts.forEach((name, j) => {
    const port = `i${j}`
    inetPorts.push(port)
    batches.push(
      ipBatch(
        hostNs(name),
        [
          'link set lo up',
          `link add eth0 type veth peer name ${port} netns ${inet}`,
          `addr add ${INTERNET_NET}.${100 + j}/24 dev eth0`,
          'link set eth0 up',
        ],
        signal,
      ),
    )
  })
  await Promise.all(batches)

  // 4. Plug the far ends into their bridges; NAT in the routers.
  const last: Promise<unknown>[] = [
    ipBatch(
      inet,
      inetPorts.flatMap((port) => [`link set ${port} master br0`, `link set ${port} up`]),
      signal,
    ),
  ]
  for (const c of p.clouds) {
    const ports = routerPorts.get(c.ns) ?? []
    last.push(
      ipBatch(
        c.ns,
        ports.flatMap((port) => [`link set ${port} master lan0`, `link set ${port} up`]),
        signal,
      ),
    )
    last.push(
      (async () => {
        for (const r of natRules(topo.firewall, c.nat)) {
          await runChecked('ip', ['netns', 'exec', c.ns, r.cmd, ...r.args], {
            input: r.input,
            signal,
            timeoutMs: 30_000,
          })
        }
      })(),
    )
  }
  await Promise.all(last)

  // 5. The objects.
  for (const c of p.clouds) {
    const router = new HostImpl(topo, `${c.spec.name}-router`, c.ns, c.publicIp, c.spec.name)
    const hosts = c.hostNames.map(
      (name, k) => new HostImpl(topo, name, hostNs(name), `${c.lanNet}.${10 + k}`, c.spec.name),
    )
    topo.addHost(router)
    for (const h of hosts) topo.addHost(h)
    topo.clouds.push(new CloudImpl(topo, c.spec.name, c.nat, c.publicIp, `${c.lanNet}.0/24`, router, hosts))
  }
  p.internetHosts.forEach((name, j) => {
    const h = new HostImpl(topo, name, hostNs(name), `${INTERNET_NET}.${100 + j}`)
    topo.addHost(h)
    topo.internet.hosts.push(h)
  })
}

/**
 * Makes net.core.{r,w}mem_max at least `wanted` for sockets in the namespaces and returns the value in
 * effect. Kernels where these sysctls are per-namespace take the value per namespace. Where they are
 * not (measured on 6.18: inside a netns /proc/sys/net/core/rmem_max is a read-only mirror of the
 * host's, and sockets are limited by the host's value), the host-wide value is raised; it is never
 * lowered.
 */
async function ensureUdpBuffers(nsList: string[], wanted: number, signal?: AbortSignal): Promise<number> {
  const keys = [`net.core.rmem_max=${wanted}`, `net.core.wmem_max=${wanted}`]
  const probe = nsList[0]!
  const first = await execCommand('ip', ['netns', 'exec', probe, 'sysctl', '-q', '-w', ...keys], {
    signal,
    timeoutMs: 30_000,
  })
  if (first.code === 0) {
    await Promise.all(
      nsList.slice(1).map((ns) =>
        runChecked('ip', ['netns', 'exec', ns, 'sysctl', '-q', '-w', ...keys], {
          signal,
          timeoutMs: 30_000,
        }),
      ),
    )
  } else {
    for (const key of ['rmem_max', 'wmem_max']) {
      const path = `/proc/sys/net/core/${key}`
      try {
        if (Number(readFileSync(path, 'utf8').trim()) < wanted) writeFileSync(path, `${wanted}\n`)
      } catch {
        // Not writable here (not root, or we are ourselves in a non-initial netns): report what is in effect.
      }
    }
  }
  const r = await execCommand(
    'ip',
    ['netns', 'exec', probe, 'cat', '/proc/sys/net/core/rmem_max', '/proc/sys/net/core/wmem_max'],
    {
      signal,
      timeoutMs: 30_000,
    },
  )
  const values = r.stdout
    .split(/\s+/)
    .filter((s) => s !== '')
    .map(Number)
  if (r.code !== 0 || values.length !== 2 || values.some((v) => !Number.isFinite(v))) {
    // The sysctls do not exist in a namespace on this kernel: nothing to report.
    return 0
  }
  return Math.min(values[0]!, values[1]!)
}

// Re-exported so that fixtures built on this one need a single import.
export { NetnsError, sleep }
