/**
 * `npm run bench -- chunks [--mib N] [--keep]`: the chunk layer's throughput.
 *
 * In one process over the in-memory overlay (the protocol + store ceiling, no network cost):
 *   - manifest build of an N MiB file (hash only, and hash + import into a store),
 *   - fetch from one holder (`fetchMBps`) and from three (`fetch3MBps`), with CPU seconds per MB,
 *   - the raw channel rate of the same memory link (`linkMBps`),
 *   - pulling v2 that shares 90% of its chunks with v1 (`dedupWireRatio` = wire bytes / size of v2).
 * Then (unless `--memory-only`) the same between separate processes over werift WebRTC links on
 * loopback (test/system/chunk-node.ts, one process per node): fetch from one holder, from three, the
 * raw link rate of a werift pair in the same run (test/bench/link.ts), and the v2 pull. When that part
 * runs, the top-level figures are the two-process ones and the in-process ones move under `memory`.
 * Cross-cloud runs (agents in NAT'd namespaces) are the lead's agent bench.
 *
 * Last stdout line: {"bench":"chunks","fetchMBps":…,"fetch3MBps":…,"linkMBps":…,"dedupWireRatio":…,…}
 */
import { spawn } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type ChunkService, createChunkService } from '../../net/chunks/exchange.ts'
import type { ChunkStore, Manifest } from '../../net/chunks/interfaces.ts'
import { buildManifest } from '../../net/chunks/manifest.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { writeTestFile, writeVariant } from '../../net/chunks/testing.ts'
import { createMemoryNetwork, type MemoryNetwork } from '../../net/link/memory.ts'
import { PeerProcess } from '../helpers/webrtc-peer-process.ts'
import { startSignalRelay } from '../helpers/webrtc-signal-relay.ts'
import type { ChunkNodeConfig } from '../system/chunk-node.ts'

export interface ChunksBenchOptions {
  mib?: number
  /** Also run the two-process WebRTC part (default true). */
  webrtc?: boolean
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
  transport: 'memory' | 'webrtc'
  memory?: ChunksBenchResult
  webrtcError?: string
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

const NODE_SCRIPT = new URL('../system/chunk-node.ts', import.meta.url).pathname

/** Two-process (and four-process) runs over werift links on loopback. */
async function webrtcBench(
  mib: number,
  log: (s: string) => void,
): Promise<Omit<ChunksBenchResult, 'memory'>> {
  const dir = await mkdtemp(join(tmpdir(), 'bench-chunks-rtc-'))
  const relay = await startSignalRelay('127.0.0.1')
  const procs: PeerProcess[] = []
  const start = async (name: string, links: ChunkNodeConfig['links']): Promise<PeerProcess> => {
    const cfg: ChunkNodeConfig = {
      name,
      store: join(dir, name),
      relay: { host: '127.0.0.1', port: relay.port },
      links,
      iceAdditionalHostAddresses: ['127.0.0.1'],
    }
    const path = join(dir, `${name}.json`)
    await writeFile(path, JSON.stringify(cfg), { mode: 0o600 })
    const p = new PeerProcess(
      spawn(process.execPath, ['--import', 'tsx', NODE_SCRIPT, path], { stdio: 'pipe' }),
    )
    procs.push(p)
    return p
  }
  const cpuOf = (e: Record<string, unknown>) => Number(e.mbps)
  try {
    const file = join(dir, 'v1.bin')
    const h1 = await start('h1', [
      { peer: 'd1', initiator: true, room: 'h1-d1' },
      { peer: 'd3', initiator: true, room: 'h1-d3' },
    ])
    h1.send({ cmd: 'seed', file, mib })
    const { id } = (await h1.next('seeded', 300_000)) as unknown as { id: string }
    const d1 = await start('d1', [{ peer: 'h1', initiator: false, room: 'h1-d1' }])
    d1.send({ cmd: 'connect' })
    // h1's link to d3 is opened later, when d3 exists (a link waits at most 30 s for its peer).
    h1.send({ cmd: 'connect', peers: ['d1'] })
    await d1.next('open', 60_000)
    d1.send({ cmd: 'fetch', id })
    const f1 = await d1.next('fetched', 900_000)
    const fetchMBps = cpuOf(f1)
    log(`webrtc, 2 processes: fetch from 1 holder ${fetchMBps.toFixed(1)} MB/s`)

    h1.send({ cmd: 'variant', src: file, file: join(dir, 'v2.bin'), fraction: 0.1 })
    const v2 = (await h1.next('seeded', 300_000)) as unknown as { id: string; size: number }
    d1.send({ cmd: 'fetch', id: v2.id })
    const f2 = await d1.next('fetched', 900_000)
    const dedupWireRatio = (Number(f2.wireIn) + Number(f2.wireOut)) / v2.size
    log(`webrtc v2 pull: wire ratio ${dedupWireRatio.toFixed(3)}`)
    d1.send({ cmd: 'exit' })

    const h2 = await start('h2', [{ peer: 'd3', initiator: true, room: 'h2-d3' }])
    const h3 = await start('h3', [{ peer: 'd3', initiator: true, room: 'h3-d3' }])
    for (const h of [h2, h3]) h.send({ cmd: 'seed', file })
    for (const h of [h2, h3]) await h.next('seeded', 300_000)
    for (const h of [h2, h3]) h.send({ cmd: 'connect' })
    h1.send({ cmd: 'connect', peers: ['d3'] })
    const d3 = await start('d3', [
      { peer: 'h1', initiator: false, room: 'h1-d3' },
      { peer: 'h2', initiator: false, room: 'h2-d3' },
      { peer: 'h3', initiator: false, room: 'h3-d3' },
    ])
    d3.send({ cmd: 'connect' })
    await d3.next('open', 60_000)
    d3.send({ cmd: 'fetch', id })
    const f3 = await d3.next('fetched', 900_000)
    const fetch3MBps = cpuOf(f3)
    log(`webrtc, 4 processes: fetch from 3 holders ${fetch3MBps.toFixed(1)} MB/s`)
    for (const p of procs) p.send({ cmd: 'exit' })

    // The raw rate of a werift pair between two processes, in the same run (test/bench/link.ts).
    const { measureLinkPair } = await import('./link.ts')
    const sp = (cmd: string, args: string[]) => spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] })
    const link = await measureLinkPair(
      {
        spawnA: sp,
        spawnB: sp,
        bHost: '127.0.0.1',
        relay: { host: '127.0.0.1', port: relay.port },
        iceServers: [],
        extraHost: ['127.0.0.1'],
        where: 'loopback',
      },
      Math.min(mib, 128),
    )
    log(`werift link raw: ${link.mbps} MB/s (TCP ${link.tcpMbps} MB/s)`)
    return {
      fetchMBps: round(fetchMBps),
      fetch3MBps: round(fetch3MBps),
      linkMBps: round(link.mbps),
      dedupWireRatio: round(dedupWireRatio, 4),
      manifestMBps: 0,
      importMBps: 0,
      fetchCpuMsPerMB: 0,
      fetch3CpuMsPerMB: 0,
      fileMiB: mib,
      transport: 'webrtc',
    }
  } finally {
    for (const p of procs) p.child.kill('SIGKILL')
    await relay.close()
    await rm(dir, { recursive: true, force: true })
  }
}

export async function runChunksBench(opts: ChunksBenchOptions = {}): Promise<ChunksBenchResult> {
  const log = opts.log ?? ((s: string) => process.stderr.write(`[bench chunks] ${s}\n`))
  const memory = await memoryBench(opts)
  if (opts.webrtc === false) return memory
  try {
    const rtc = await webrtcBench(opts.mib ?? 256, log)
    return {
      ...rtc,
      manifestMBps: memory.manifestMBps,
      importMBps: memory.importMBps,
      fetchCpuMsPerMB: memory.fetchCpuMsPerMB,
      fetch3CpuMsPerMB: memory.fetch3CpuMsPerMB,
      memory,
    }
  } catch (err) {
    log(`webrtc part failed: ${err instanceof Error ? err.message : String(err)}`)
    return { ...memory, webrtcError: err instanceof Error ? err.message : String(err) }
  }
}

/** Entry for test/bench/main.ts: `npm run bench -- chunks [--mib N] [--memory-only] [--keep]`. */
export async function main(args: string[]): Promise<Record<string, unknown>> {
  const at = args.indexOf('--mib')
  const mib = at >= 0 ? Number(args[at + 1]) : 256
  const r = await runChunksBench({
    mib,
    keep: args.includes('--keep'),
    webrtc: !args.includes('--memory-only'),
  })
  // The four headline fields last, so the JSON line ends with them.
  const { fetchMBps, fetch3MBps, linkMBps, dedupWireRatio, ...rest } = r
  return { ...rest, fetchMBps, fetch3MBps, linkMBps, dedupWireRatio }
}
