/**
 * `npm run bench -- link [--mib N] [--clouds] [--engine werift|libdatachannel]`: a WebRTC link between
 * two processes (each its own Node, as two agents would be), with raw TCP between the same two places
 * measured in the same run. `--engine libdatachannel` measures the node-datachannel engine
 * (net/webrtc/ndc) and, in the same run, werift as its baseline (`weriftMbps`).
 *
 * Default: both processes on loopback. `--clouds` (root): the two processes in hosts of two different
 * cone-NAT'd clouds of the clouds fixture (on the WAN profile of `--profile P` / $MESH_TEST_PROFILE), STUN
 * and the signaling relay on an internet host. There, in one topology:
 *   --runs N (default 1): every engine and both TCP baselines measured N times, in turns; medians;
 *   --engines werift,libdatachannel (default: --engine): the engines to measure;
 *   --werift-cc tolerant|reno, --ndc-cc 0..3 (usrsctp module), --ndc-buf MiB: SCTP settings to compare;
 * the baselines are iperf3 from a1 to b1 through both NATs (b's router forwards the port), one TCP
 * stream with cubic (`tcpMbps`, what most cloud images run) and one with BBR (`tcpBbrMbps`),
 * `--tcp-seconds` long (default 8).
 *
 * Prints progress on stderr; the result (last stdout line, via test/bench/main.ts, or from
 * runLinkBench() when run directly) is
 *   {"bench":"link","mbps":…,"tcpMbps":…,"rttMs":…,"path":"…","engine":"werift","setupMs":…}
 * and with --clouds also {"profile":…,"tcpBbrMbps":…,"engines":{"werift":{"mbps":…,"runs":[…]},…},
 * "tcpRuns":[…],"tcpBbrRuns":[…],"load":[…]}.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import type { Host, Topology } from '../../fixtures/testnet/clouds.ts'
import { PEER_SCRIPT, PeerProcess, peerConfigDir, RELAY_SCRIPT } from '../helpers/webrtc-peer-process.ts'
import { startSignalRelay } from '../helpers/webrtc-signal-relay.ts'

const NODE = process.execPath
const STUN_SCRIPT = fileURLToPath(new URL('../../net/stun/server.ts', import.meta.url))

export interface LinkBenchResult {
  mbps: number
  tcpMbps: number
  rttMs: number
  path: string
  engine: 'werift' | 'libdatachannel'
  /** With --engine libdatachannel: werift between the same two places in the same run. */
  weriftMbps?: number
  setupMs: number
  mib: number
  where: 'loopback' | 'clouds'
  /** --clouds: the WAN profile, the BBR baseline, per-engine medians and every run, the load. */
  profile?: string
  tcpBbrMbps?: number
  tcpCc?: string
  engines?: Record<string, { mbps: number; runs: number[]; rttMs: number; path: string }>
  tcpRuns?: number[]
  tcpBbrRuns?: number[]
  settings?: Record<string, unknown>
  load?: number[]
}

const log = (s: string) => process.stderr.write(`[bench link] ${s}\n`)

// Raw TCP baseline: a sink that counts N bytes and prints the elapsed time, a source that writes them.
const TCP_SINK = `
const n = Number(process.argv[2]); let got = 0, t0 = 0
const srv = require('node:net').createServer((c) => {
  c.on('data', (d) => { if (!t0) t0 = performance.now(); got += d.length
    if (got >= n) { console.log(JSON.stringify({ tcp: got, ms: performance.now() - t0 })); c.destroy(); srv.close() } })
  c.on('error', () => {})
}).listen(0, process.argv[1], () => console.log(JSON.stringify({ port: srv.address().port })))`
const TCP_SOURCE = `
const [host, port, n] = [process.argv[1], Number(process.argv[2]), Number(process.argv[3])]
const buf = Buffer.alloc(256 * 1024, 7); let sent = 0
const s = require('node:net').connect({ host, port }, function pump() {
  while (sent < n) { sent += buf.length; if (!s.write(buf)) return s.once('drain', pump) }
  s.end() })
s.on('error', () => {})`

type Spawner = (cmd: string, args: string[]) => ChildProcess

function firstJson(child: ChildProcess, key: string, timeoutMs: number): Promise<Record<string, number>> {
  return new Promise((resolve, reject) => {
    let buf = ''
    const timer = setTimeout(
      () => reject(new Error(`no '${key}' line within ${timeoutMs} ms; output: ${buf.slice(-500)}`)),
      timeoutMs,
    )
    child.stderr?.on('data', (b: Buffer) => {
      buf += b.toString()
    })
    child.stdout?.on('data', (b: Buffer) => {
      buf += b.toString()
      for (const line of buf.split('\n')) {
        if (!line.startsWith('{')) continue
        try {
          const o = JSON.parse(line) as Record<string, number>
          if (key in o) {
            clearTimeout(timer)
            resolve(o)
          }
        } catch {}
      }
    })
  })
}

async function measureTcp(spawnA: Spawner, spawnB: Spawner, bHost: string, bytes: number): Promise<number> {
  const sink = spawnB(NODE, ['-e', TCP_SINK, bHost, String(bytes)])
  const { port } = await firstJson(sink, 'port', 30_000)
  const done = firstJson(sink, 'tcp', 120_000)
  const src = spawnA(NODE, ['-e', TCP_SOURCE, bHost, String(port), String(bytes)])
  const { ms } = await done
  src.kill()
  sink.kill()
  return bytes / 1e6 / (ms! / 1000)
}

/** SCTP settings passed to the peers (see test/helpers/webrtc-peer.ts). */
export interface EngineSettings {
  congestionControl?: 'tolerant' | 'reno'
  ndcSctp?: Record<string, number>
}

export interface PairSetup {
  spawnA: Spawner
  spawnB: Spawner
  /** Where the raw TCP baseline's sink runs (default: with B) and its address. */
  bHost: string
  tcpSpawnSink?: Spawner
  relay: { host: string; port: number }
  iceServers: { urls: string }[]
  extraHost?: string[]
  where: 'loopback' | 'clouds'
  settings?: EngineSettings
}

type Engine = LinkBenchResult['engine']

export async function measureLinkPair(
  setup: PairSetup,
  mib: number,
  engine: Engine = 'werift',
): Promise<LinkBenchResult> {
  const main = await measureEngine(setup, mib, engine)
  // The same-run werift baseline for another engine (werift is slow: at most 32 MiB of it).
  const weriftMbps =
    engine === 'werift' ? undefined : (await measureEngine(setup, Math.min(mib, 32), 'werift')).mbps
  const tcpMbps = await measureTcp(
    setup.spawnA,
    setup.tcpSpawnSink ?? setup.spawnB,
    setup.bHost,
    Math.max(mib * 1024 * 1024, 256 * 1024 * 1024),
  )
  log(`raw TCP: ${tcpMbps.toFixed(1)} MB/s`)
  return {
    mbps: round(main.mbps),
    tcpMbps: round(tcpMbps),
    rttMs: round(main.rttMs),
    path: main.path,
    engine,
    ...(weriftMbps === undefined ? {} : { weriftMbps: round(weriftMbps) }),
    setupMs: main.setupMs,
    mib,
    where: setup.where,
  }
}

export async function measureEngine(
  setup: PairSetup,
  mib: number,
  engine: Engine,
): Promise<{ mbps: number; rttMs: number; path: string; setupMs: number }> {
  const cfgs = peerConfigDir()
  const peers: PeerProcess[] = []
  try {
    const room = `bench-${process.pid}-${Date.now()}`
    for (const [name, peer, initiator, sp] of [
      ['a', 'b', true, setup.spawnA],
      ['b', 'a', false, setup.spawnB],
    ] as const) {
      const path = cfgs.write(name, {
        name,
        peer,
        initiator,
        relay: setup.relay,
        room,
        iceServers: setup.iceServers,
        engine,
        ...(engine === 'werift' && setup.settings?.congestionControl !== undefined
          ? { congestionControl: setup.settings.congestionControl }
          : {}),
        ...(engine === 'libdatachannel' && setup.settings?.ndcSctp !== undefined
          ? { ndcSctp: setup.settings.ndcSctp }
          : {}),
        ...(setup.extraHost ? { iceAdditionalHostAddresses: setup.extraHost } : {}),
      })
      peers.push(new PeerProcess(sp(NODE, ['--import', 'tsx', PEER_SCRIPT, path])))
    }
    const [a, b] = peers as [PeerProcess, PeerProcess]
    a.send({ cmd: 'connect' })
    b.send({ cmd: 'connect' })
    const [openA] = await Promise.all([a.next('open', 60_000), b.next('open', 60_000)])
    const path = (openA.path as { type: string }).type
    log(`${engine} link open: ${JSON.stringify(openA.path)} in ${openA.setupMs} ms`)
    a.send({ cmd: 'ping', n: 20 })
    const rtt = await a.next('rtt', 60_000)
    log(`rtt median ${Number(rtt.ms).toFixed(2)} ms`)
    const bytes = mib * 1024 * 1024
    const t0 = performance.now()
    a.send({ cmd: 'send', bytes })
    const got = await b.next('received', 600_000)
    const secs = (performance.now() - t0) / 1000
    if (got.ok !== true) throw new Error('link bench: received data does not match what was sent')
    const mbps = bytes / 1e6 / secs
    log(`${engine} ${mib} MiB: ${mbps.toFixed(1)} MB/s`)
    a.send({ cmd: 'exit' })
    b.send({ cmd: 'exit' })
    return { mbps, rttMs: Number(rtt.ms), path, setupMs: Number(openA.setupMs) }
  } finally {
    for (const p of peers) p.child.kill('SIGKILL')
    cfgs.remove()
  }
}

const round = (x: number) => Math.round(x * 100) / 100

async function loopback(mib: number, engine: Engine): Promise<LinkBenchResult> {
  const relay = await startSignalRelay('127.0.0.1')
  const children: ChildProcess[] = []
  const sp: Spawner = (cmd, args) => {
    const c = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] })
    children.push(c)
    return c
  }
  try {
    return await measureLinkPair(
      {
        spawnA: sp,
        spawnB: sp,
        bHost: '127.0.0.1',
        relay: { host: '127.0.0.1', port: relay.port },
        iceServers: [],
        extraHost: ['127.0.0.1'],
        where: 'loopback',
      },
      mib,
      engine,
    )
  } finally {
    for (const c of children) c.kill('SIGKILL')
    await relay.close()
  }
}

/** Starts the STUN responder and the signaling relay on an internet host of a clouds topology. */
export async function startRendezvous(boot: Host): Promise<{ relayPort: number; stunPort: number }> {
  const { waitForLine } = await import('../../fixtures/testnet/clouds.ts')
  const relay = boot.spawn(NODE, ['--import', 'tsx', RELAY_SCRIPT, boot.ip, '7000'])
  const stun = boot.spawn(NODE, ['--import', 'tsx', STUN_SCRIPT, boot.ip, '3478'])
  await waitForLine(relay, /"listening"/, 30_000)
  await waitForLine(stun, /"listening"/, 30_000)
  return { relayPort: 7000, stunPort: 3478 }
}

function median(xs: number[]): number {
  const v = xs.filter(Number.isFinite).sort((a, b) => a - b)
  if (v.length === 0) return Number.NaN
  const m = v.length >> 1
  return v.length % 2 === 1 ? v[m]! : (v[m - 1]! + v[m]!) / 2
}

const IPERF_PORT = 5201

/** iperf3 from a1 to b1 (b's router forwards the port), a1 sending; MB/s as b1 received it. */
async function iperf(
  a1: Host,
  b1: Host,
  bPublic: string,
  seconds: number,
  cc: string,
): Promise<{ mbps: number; cc: string }> {
  const { waitForLine } = await import('../../fixtures/testnet/clouds.ts')
  const server = b1.spawn('iperf3', ['-s', '-1', '--forceflush', '-p', String(IPERF_PORT)])
  try {
    await waitForLine(server, /Server listening/, 10_000)
    const r = await a1.exec(
      'iperf3',
      ['-c', bPublic, '-p', String(IPERF_PORT), '-t', String(seconds), '-J', ...(cc ? ['-C', cc] : [])],
      { timeoutMs: (seconds + 60) * 1000 },
    )
    const j = JSON.parse(r.stdout) as {
      error?: string
      end?: { sum_received?: { bits_per_second?: number }; sender_tcp_congestion?: string }
    }
    if (j.error !== undefined) throw new Error(`iperf3: ${j.error}`)
    return {
      mbps: (j.end?.sum_received?.bits_per_second ?? 0) / 8e6,
      cc: j.end?.sender_tcp_congestion ?? '?',
    }
  } finally {
    if (server.exitCode === null && server.signalCode === null) server.kill('SIGKILL')
  }
}

interface CloudsOptions {
  mib: number
  engines: Engine[]
  runs: number
  tcpSeconds: number
  settings: EngineSettings
}

async function clouds(o: CloudsOptions): Promise<LinkBenchResult> {
  const { createClouds } = await import('../../fixtures/testnet/clouds.ts')
  const { profileFromEnv } = await import('../../fixtures/wan/profiles.ts')
  const { loadavg } = await import('node:os')
  const profile = profileFromEnv() // `npm run bench -- link --clouds --profile crosscloud`
  const topo: Topology = await createClouds({
    clouds: [
      { name: 'a', nat: 'cone' },
      { name: 'b', nat: 'cone' },
    ],
    internetHosts: ['boot'],
    profile,
  })
  try {
    const boot = topo.host('boot')
    const { relayPort, stunPort } = await startRendezvous(boot)
    const a1 = topo.host('a1')
    const b1 = topo.host('b1')
    const bCloud = topo.cloud('b')
    await bCloud.forwardTcp(IPERF_PORT, b1)
    const setup: PairSetup = {
      spawnA: (c, args) => a1.spawn(c, args, { stdio: ['pipe', 'pipe', 'pipe'] }),
      spawnB: (c, args) => b1.spawn(c, args, { stdio: ['pipe', 'pipe', 'pipe'] }),
      bHost: boot.ip,
      relay: { host: boot.ip, port: relayPort },
      iceServers: [{ urls: `stun:${boot.ip}:${stunPort}` }],
      where: 'clouds',
      settings: o.settings,
    }
    const per: Record<string, { runs: number[]; rtt: number[]; path: string; setup: number[] }> = {}
    const tcpRuns: number[] = []
    const tcpBbrRuns: number[] = []
    const load: number[] = []
    let tcpCc = '?'
    for (let run = 0; run < o.runs; run++) {
      for (const engine of o.engines) {
        const r = await measureEngine(setup, o.mib, engine).catch((err: Error) => {
          log(`${engine} run ${run + 1} failed: ${err.message}`)
          return { mbps: Number.NaN, rttMs: Number.NaN, path: '?', setupMs: Number.NaN }
        })
        per[engine] ??= { runs: [], rtt: [], path: r.path, setup: [] }
        const e = per[engine]
        e.runs.push(round(r.mbps))
        e.rtt.push(r.rttMs)
        e.setup.push(r.setupMs)
        if (e.path === '?') e.path = r.path
      }
      const t = await iperf(a1, b1, bCloud.publicIp, o.tcpSeconds, 'cubic')
      tcpCc = t.cc
      tcpRuns.push(round(t.mbps))
      tcpBbrRuns.push(round((await iperf(a1, b1, bCloud.publicIp, o.tcpSeconds, 'bbr')).mbps))
      load.push(round(loadavg()[0]!))
      log(
        `run ${run + 1}/${o.runs}: ${o.engines.map((e) => `${e} ${per[e]!.runs.at(-1)}`).join(', ')}, tcp ${tcpCc} ${tcpRuns.at(-1)}, bbr ${tcpBbrRuns.at(-1)} MB/s (load ${load.at(-1)})`,
      )
    }
    const engines: NonNullable<LinkBenchResult['engines']> = {}
    for (const [name, e] of Object.entries(per))
      engines[name] = { mbps: round(median(e.runs)), runs: e.runs, rttMs: round(median(e.rtt)), path: e.path }
    const first = o.engines[0]!
    return {
      mbps: engines[first]!.mbps,
      tcpMbps: round(median(tcpRuns)),
      rttMs: engines[first]!.rttMs,
      path: engines[first]!.path,
      engine: first,
      setupMs: round(median(per[first]!.setup)),
      mib: o.mib,
      where: 'clouds',
      profile,
      tcpBbrMbps: round(median(tcpBbrRuns)),
      tcpCc,
      engines,
      tcpRuns,
      tcpBbrRuns,
      settings: { ...o.settings },
      load,
    }
  } finally {
    await topo.destroy()
  }
}

export async function runLinkBench(args: string[] = []): Promise<LinkBenchResult> {
  const arg = (name: string) => {
    const i = args.indexOf(name)
    return i >= 0 ? args[i + 1] : undefined
  }
  const mib = Number(arg('--mib') ?? 32)
  const engine = arg('--engine') ?? 'werift'
  const engines = (arg('--engines') ?? engine).split(',')
  for (const e of engines)
    if (e !== 'werift' && e !== 'libdatachannel')
      throw new Error(`--engine(s): expected werift or libdatachannel, got ${e}`)
  const settings: EngineSettings = {}
  const cc = arg('--werift-cc')
  if (cc !== undefined) {
    if (cc !== 'tolerant' && cc !== 'reno') throw new Error(`--werift-cc: tolerant or reno, got ${cc}`)
    settings.congestionControl = cc
  }
  const ndc: Record<string, number> = {}
  if (arg('--ndc-cc') !== undefined) ndc.congestionControlModule = Number(arg('--ndc-cc'))
  if (arg('--ndc-buf') !== undefined) {
    ndc.recvBufferSize = Number(arg('--ndc-buf')) * 1024 * 1024
    ndc.sendBufferSize = ndc.recvBufferSize
  }
  if (Object.keys(ndc).length > 0) settings.ndcSctp = ndc
  if (args.includes('--clouds'))
    return clouds({
      mib,
      engines: engines as Engine[],
      runs: Number(arg('--runs') ?? 1),
      tcpSeconds: Number(arg('--tcp-seconds') ?? 8),
      settings,
    })
  return loopback(mib, engine as Engine)
}

/** Entry point for test/bench/main.ts (`npm run bench -- link`). */
export async function main(args: string[]): Promise<Record<string, unknown>> {
  return { ...(await runLinkBench(args)) }
}

if (
  process.argv[1] !== undefined &&
  import.meta.url.endsWith('/bench/link.ts') &&
  process.argv[1].endsWith('link.ts')
) {
  const r = await runLinkBench(process.argv.slice(2))
  process.stdout.write(`${JSON.stringify({ bench: 'link', ...r })}\n`)
}
