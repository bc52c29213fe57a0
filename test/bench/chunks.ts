/**
 * `npm run bench -- chunks [--mib N] [--engine E] [--no-direct] [--memory-only] [--clouds-only] [--one-holder]
 * [--cpu-prof DIR]`: the chunk layer's throughput. `--clouds-only` skips part 1; `--one-holder` stops part 2
 * after the one-holder pull and its baselines; `--cpu-prof DIR` makes the agents write V8 CPU profiles
 * there (h1 and p1 during the one-holder pull, then during the plain stream); `--perf DIR` records them
 * with Linux perf the same way.
 *
 * 1. In one process over the in-memory overlay (the protocol + store ceiling, no network cost, under
 *    `memory`): manifest build, fetch from one holder and from three with CPU ms per MB, the memory
 *    channel's raw rate, the v2 pull.
 * 2. Between agents in NAT'd clouds (test/bench/_chunks-clouds.ts; real `mesh agent` processes, the
 *    CLI): fetch N MiB of random data from one holder (`fetchMBps`) and from three (`fetch3MBps`);
 *    in the same run the overlay link's raw rate (`linkMBps`, WebRTC) and a plain libp2p stream's
 *    between the same two agents (`libp2pTcpMBps`); then v2 sharing 90% of its chunks
 *    (`dedupWireRatio` = bytes fetched / size of v2). `path` says how the pulls travelled
 *    (`direct-tcp` or `webrtc-<ICE type>`), `engine` which WebRTC implementation the links used.
 *
 * Last stdout line: {"bench":"chunks",…,"engine":…,"path":…,"libp2pTcpMBps":…,"fetchMBps":…,"fetch3MBps":…,"linkMBps":…,"dedupWireRatio":…}
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { type ChunkService, createChunkService } from '../../net/chunks/exchange.ts'
import type { ChunkStore, Manifest } from '../../net/chunks/interfaces.ts'
import { buildManifest } from '../../net/chunks/manifest.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { writeTestFile, writeVariant } from '../../net/chunks/testing.ts'
import { createMemoryNetwork, type MemoryNetwork } from '../../net/link/memory.ts'
import { chunksAcrossClouds } from './_chunks-clouds.ts'

export interface ChunksBenchOptions {
  mib?: number
  /** Also run the part between agents in NAT'd clouds (default true; needs root). */
  clouds?: boolean
  engine?: 'werift' | 'libdatachannel'
  /** Direct paths for bulk channels (default true, as agents run by default). */
  direct?: boolean
  /** Skip the in-process part (1). */
  cloudsOnly?: boolean
  /** Part 2: stop after the one-holder pull and its baselines. */
  oneHolder?: boolean
  /** Part 2: agents write V8 CPU profiles into this directory (see _chunks-clouds.ts). */
  cpuProfDir?: string
  /** Part 2: `perf record` h1 and p1 into this directory (see _chunks-clouds.ts). */
  perfDir?: string
  /** Keep the temp dir (for inspection). */
  keep?: boolean
  log?: (line: string) => void
}

export interface ChunksBenchResult {
  fetchMBps: number
  fetch3MBps: number
  linkMBps: number
  dedupWireRatio: number
  manifestMBps: number
  importMBps: number
  fetchCpuMsPerMB: number
  fetch3CpuMsPerMB: number
  fileMiB: number
  transport: 'memory'
}

const MiB = 1024 * 1024
const round = (x: number, d = 2) => Math.round(x * 10 ** d) / 10 ** d

async function timed<T>(fn: () => Promise<T>): Promise<{ v: T; secs: number; cpuMs: number }> {
  const c0 = process.cpuUsage()
  const t0 = performance.now()
  const v = await fn()
  const secs = (performance.now() - t0) / 1000
  const c = process.cpuUsage(c0)
  return { v, secs, cpuMs: (c.user + c.system) / 1000 }
}

/** Raw rate of a memory 'chunks' channel: 64 KiB messages with backpressure, as the service sends. */
async function linkRate(net: MemoryNetwork, bytes: number): Promise<number> {
  net.connect('la', 'lb')
  const tx = net.node('la').link('lb')!.channel('chunks')
  const rx = net.node('lb').link('la')!.channel('chunks')
  const msg = Buffer.alloc(64 * 1024 + 40, 1)
  let got = 0
  const done = new Promise<void>((resolve) => {
    rx.onMessage((m) => {
      got += m.byteLength
      if (got >= bytes) resolve()
    })
  })
  const t0 = performance.now()
  for (let sent = 0; sent < bytes; sent += msg.byteLength) if (!tx.send(msg)) await tx.onDrain()
  await done
  const secs = (performance.now() - t0) / 1000
  net.disconnect('la', 'lb')
  return bytes / 1e6 / secs
}

async function memoryBench(opts: ChunksBenchOptions = {}): Promise<ChunksBenchResult> {
  const mib = opts.mib ?? 256
  const log = opts.log ?? ((s: string) => process.stderr.write(`[bench chunks] ${s}\n`))
  const dir = await mkdtemp(join(tmpdir(), 'bench-chunks-'))
  const services: ChunkService[] = []
  const stores = new Map<string, ChunkStore>()
  try {
    const size = mib * MiB
    const v1 = join(dir, 'v1.bin')
    await writeTestFile(v1, size)
    const hashOnly = await timed(() => buildManifest(v1))
    const manifestMBps = size / 1e6 / hashOnly.secs
    log(`manifest build ${mib} MiB (hash only): ${manifestMBps.toFixed(0)} MB/s`)

    const net = createMemoryNetwork()
    const svc = async (id: string) => {
      const store = await openChunkStore({ dir: join(dir, id) })
      const s = createChunkService({ overlay: net.node(id), store })
      s.start()
      services.push(s)
      stores.set(id, store)
      return s
    }
    const holders = ['h1', 'h2', 'h3']
    for (const h of holders) await svc(h)
    const imported = await timed(() => buildManifest(v1, { store: stores.get('h1')!, pin: 'v1' }))
    const importMBps = size / 1e6 / imported.secs
    log(`manifest build + import into a store: ${importMBps.toFixed(0)} MB/s`)
    const m1: Manifest = imported.v.manifest
    for (const h of holders.slice(1)) await buildManifest(v1, { store: stores.get(h)!, pin: 'v1' })

    const one = await svc('one')
    net.connect('one', 'h1')
    const f1 = await timed(() => one.fetch(m1))
    const fetchMBps = size / 1e6 / f1.secs
    log(
      `fetch from 1 holder: ${fetchMBps.toFixed(1)} MB/s, ${(f1.cpuMs / (size / 1e6)).toFixed(2)} CPU ms/MB`,
    )

    const three = await svc('three')
    for (const h of holders) net.connect('three', h)
    const f3 = await timed(() => three.fetch(m1))
    const fetch3MBps = size / 1e6 / f3.secs
    log(
      `fetch from 3 holders: ${fetch3MBps.toFixed(1)} MB/s, ${(f3.cpuMs / (size / 1e6)).toFixed(2)} CPU ms/MB`,
    )

    const linkMBps = await linkRate(net, size)
    log(`memory channel raw: ${linkMBps.toFixed(0)} MB/s`)

    const v2 = join(dir, 'v2.bin')
    await writeVariant(v1, v2, 0.1)
    const m2 = (await buildManifest(v2, { store: stores.get('h1')!, pin: 'v2' })).manifest
    const w0 = one.stats().wireBytesIn + one.stats().wireBytesOut
    await one.fetch(m2, { peers: ['h1'] })
    const wire = one.stats().wireBytesIn + one.stats().wireBytesOut - w0
    const dedupWireRatio = wire / m2.size
    log(`v2 (90% shared): ${(wire / MiB).toFixed(1)} MiB on the wire, ratio ${dedupWireRatio.toFixed(3)}`)

    return {
      fetchMBps: round(fetchMBps),
      fetch3MBps: round(fetch3MBps),
      linkMBps: round(linkMBps),
      dedupWireRatio: round(dedupWireRatio, 4),
      manifestMBps: round(manifestMBps),
      importMBps: round(importMBps),
      fetchCpuMsPerMB: round(f1.cpuMs / (size / 1e6)),
      fetch3CpuMsPerMB: round(f3.cpuMs / (size / 1e6)),
      fileMiB: mib,
      transport: 'memory',
    }
  } finally {
    for (const s of services) s.stop()
    for (const st of stores.values()) await st.close()
    if (opts.keep !== true) await rm(dir, { recursive: true, force: true })
  }
}

export async function runChunksBench(opts: ChunksBenchOptions = {}): Promise<Record<string, unknown>> {
  const log = opts.log ?? ((s: string) => process.stderr.write(`[bench chunks] ${s}\n`))
  const memory = opts.cloudsOnly === true ? undefined : await memoryBench(opts)
  if (opts.clouds === false) return { ...memory, engine: 'memory', path: 'memory' }
  const clouds = await chunksAcrossClouds({
    mib: opts.mib ?? 256,
    engine: opts.engine ?? 'werift',
    direct: opts.direct ?? true,
    log,
    ...(opts.oneHolder === true ? { oneHolder: true } : {}),
    ...(opts.cpuProfDir === undefined ? {} : { cpuProfDir: opts.cpuProfDir }),
    ...(opts.perfDir === undefined ? {} : { perfDir: opts.perfDir }),
  })
  return {
    ...clouds,
    transport: 'clouds',
    ...(memory === undefined
      ? {}
      : { manifestMBps: memory.manifestMBps, importMBps: memory.importMBps, memory }),
  }
}

/**
 * Entry for test/bench/main.ts:
 * `npm run bench -- chunks [--mib N] [--engine werift|libdatachannel] [--no-direct] [--memory-only]
 * [--clouds-only] [--one-holder] [--cpu-prof DIR] [--perf DIR] [--keep]`.
 */
export async function main(args: string[]): Promise<Record<string, unknown>> {
  const value = (flag: string) => {
    const at = args.indexOf(flag)
    return at >= 0 ? args[at + 1] : undefined
  }
  const mib = Number(value('--mib') ?? 256)
  if (!(mib > 0)) throw new Error('--mib must be a positive number')
  const engine = value('--engine') ?? 'werift'
  if (engine !== 'werift' && engine !== 'libdatachannel')
    throw new Error('--engine is werift or libdatachannel')
  if (!args.includes('--memory-only') && process.getuid?.() !== 0)
    throw new Error('the cross-cloud part needs root (network namespaces); use --memory-only without it')
  if (args.includes('--memory-only') && args.includes('--clouds-only'))
    throw new Error('--memory-only and --clouds-only exclude each other')
  const cpuProf = value('--cpu-prof')
  if (args.includes('--cpu-prof') && (cpuProf === undefined || cpuProf.startsWith('--')))
    throw new Error('--cpu-prof needs a directory')
  const perfDir = value('--perf')
  if (args.includes('--perf') && (perfDir === undefined || perfDir.startsWith('--')))
    throw new Error('--perf needs a directory')
  const r = await runChunksBench({
    cloudsOnly: args.includes('--clouds-only'),
    oneHolder: args.includes('--one-holder'),
    ...(cpuProf === undefined ? {} : { cpuProfDir: resolve(cpuProf) }),
    ...(perfDir === undefined ? {} : { perfDir: resolve(perfDir) }),
    mib,
    keep: args.includes('--keep'),
    clouds: !args.includes('--memory-only'),
    engine,
    direct: !args.includes('--no-direct'),
  })
  // The headline fields last, so the JSON line ends with them.
  const { fetchMBps, fetch3MBps, linkMBps, dedupWireRatio, libp2pTcpMBps, engine: e, path, ...rest } = r
  return { ...rest, engine: e, path, libp2pTcpMBps, fetchMBps, fetch3MBps, linkMBps, dedupWireRatio }
}
