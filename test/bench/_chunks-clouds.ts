/**
 * The chunk bench between agents in NAT'd clouds (real `mesh agent` processes in network namespaces,
 * driven through the CLI). Topology: holder clouds c1..c3 (hosts h1..h3 cone NAT, each host with one TCP port
 * forwarded on its router, as a cloud VM with a public IP and an open port has) and a puller cloud `p` (hosts p1, p2)
 * behind cone NAT with nothing forwarded. The links are WebRTC (srflx) through the NATs; with direct
 * paths on (the default) the pullers' links' bulk channels then move to a direct TCP connection to the
 * holders' public ports. `--no-direct` keeps everything on WebRTC.
 *
 * In the same run, from the puller to holder 1: the overlay link's raw rate (`mesh bench`, WebRTC
 * control channel) and a plain libp2p stream's (`mesh bench --over libp2p`, tcp+noise+yamux).
 */
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { type AgentProc, createTestnet, lastJson, type Testnet } from '../../fixtures/testnet/testnet.ts'
import { writeTestFile, writeVariant } from '../../net/chunks/testing.ts'

export interface CloudChunksOptions {
  mib: number
  engine: 'werift' | 'libdatachannel'
  direct: boolean
  log: (line: string) => void
  /** Stop after the one-holder pull and the link baselines (skip v2 and the three-holder pull). */
  oneHolder?: boolean
  /** Profile h1 and p1 during the one-holder pull, then during the plain libp2p stream bench: each
   *  writes two V8 CPU profiles (PID-0, PID-1) into this directory (test/bench/_cpu-profile.mjs,
   *  toggled by SIGUSR2). */
  cpuProfDir?: string
  /** Record h1 and p1 with Linux `perf record -g` during the pull and the plain stream bench
   *  (DIR/pull.data, DIR/stream.data; agents run with --perf-basic-prof so JS frames have names). */
  perfDir?: string
}

export interface CloudChunksResult {
  fetchMBps: number
  fetch3MBps: number
  linkMBps: number
  libp2pTcpMBps: number
  dedupWireRatio: number
  engine: string
  /** How the pulls' bulk traffic went: `direct-tcp`, or `webrtc-<ICE type>`. */
  path: string
  fileMiB: number
  libp2pPath: string
}

const PORT = 4101
const round = (x: number, d = 2) => Math.round(x * 10 ** d) / 10 ** d

interface PullResult {
  bytesFetched: number
  bytesSkipped: number
  elapsedMs: number
  from: string[]
}

/** CPU seconds (user, system) a process used so far, from /proc (clock ticks of 10 ms). */
function cpuOf(pid: number | undefined): { user: number; sys: number } {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ')
    return { user: Number(rest[11]) / 100, sys: Number(rest[12]) / 100 }
  } catch {
    return { user: 0, sys: 0 }
  }
}

/** Read and write system calls a process made so far (sockets and files alike). */
function syscallsOf(pid: number | undefined): { r: number; w: number } {
  try {
    const f = readFileSync(`/proc/${pid}/io`, 'utf8')
    const get = (k: string) => Number(new RegExp(`^${k}: (\\d+)`, 'm').exec(f)?.[1] ?? 0)
    return { r: get('syscr'), w: get('syscw') }
  } catch {
    return { r: 0, w: 0 }
  }
}

/** Machine-wide CPU seconds so far: busy in processes (user+system) and in interrupts (softirq: the
 *  namespaces' forwarding and NAT run there). */
function machineCpu(): { busy: number; softirq: number; idle: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.split(/\s+/).slice(1).map(Number)
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0] = f
  return { busy: (user + nice + system) / 100, softirq: (irq + softirq) / 100, idle: (idle + iowait) / 100 }
}

/** Runs `fn` and logs the CPU the two agents and the machine spent per MB moved meanwhile. */
async function withCpu<T>(
  what: string,
  mb: () => number,
  agents: AgentProc[],
  log: (line: string) => void,
  fn: () => Promise<T>,
): Promise<T> {
  const before = agents.map((a) => cpuOf(a.child.pid))
  const sc0 = agents.map((a) => syscallsOf(a.child.pid))
  const m0 = machineCpu()
  const v = await fn()
  const m1 = machineCpu()
  const per = agents.map((a, i) => {
    const c = cpuOf(a.child.pid)
    const b = before[i]!
    const sc = syscallsOf(a.child.pid)
    const calls = `${((sc.r - sc0[i]!.r) / mb()).toFixed(0)}r/${((sc.w - sc0[i]!.w) / mb()).toFixed(0)}w per MB`
    return `${a.name} ${(((c.user - b.user) * 1000) / mb()).toFixed(1)}u+${(((c.sys - b.sys) * 1000) / mb()).toFixed(1)}s ${calls}`
  })
  log(
    `${what}: CPU ms/MB ${per.join(', ')}; machine busy ${(((m1.busy - m0.busy) * 1000) / mb()).toFixed(1)} + softirq ${(((m1.softirq - m0.softirq) * 1000) / mb()).toFixed(1)}, idle ${(m1.idle - m0.idle).toFixed(1)} s`,
  )
  return v
}

async function ok(a: AgentProc, args: string[], timeoutMs = 900_000): Promise<string> {
  const r = await a.mesh(args, { timeoutMs })
  if (r.code !== 0)
    throw new Error(`${a.name}: mesh ${args.join(' ')} failed (${r.code}): ${r.stderr.slice(-800)}`)
  return r.stdout
}

export async function chunksAcrossClouds(opts: CloudChunksOptions): Promise<CloudChunksResult> {
  const { log } = opts
  const dir = await mkdtemp(join(tmpdir(), 'bench-chunks-clouds-'))
  let net: Testnet | undefined
  try {
    log(`building 4 NAT'd clouds (engine ${opts.engine}, direct paths ${opts.direct ? 'on' : 'off'})`)
    // Profiling hooks for the agents only (the CLI commands the bench runs stay plain).
    const nodeOptions = [
      ...(opts.cpuProfDir === undefined
        ? []
        : [`--import=${fileURLToPath(new URL('./_cpu-profile.mjs', import.meta.url))}`]),
      ...(opts.perfDir === undefined ? [] : ['--perf-basic-prof']),
    ]
    net = await createTestnet({
      clouds: [
        { name: 'c1', hosts: ['h1'] },
        { name: 'c2', hosts: ['h2'] },
        { name: 'c3', hosts: ['h3'] },
        { name: 'p', hosts: ['p1', 'p2'] },
      ],
      noJoin: true,
      agentArgs: ['--engine', opts.engine, ...(opts.direct ? [] : ['--no-direct'])],
      ...(nodeOptions.length === 0
        ? {}
        : {
            env: {
              NODE_OPTIONS: nodeOptions.join(' '),
              ...(opts.cpuProfDir === undefined ? {} : { MESH_CPU_PROFILE_DIR: opts.cpuProfDir }),
            },
          }),
    })
    const holders: AgentProc[] = []
    for (const c of net.topo.clouds.filter((c) => c.name !== 'p')) {
      const pub = await c.forwardTcp(PORT)
      holders.push(
        await net.join(c.hosts[0]!.name, {
          args: ['--listen', `/ip4/0.0.0.0/tcp/${PORT}`, '--announce', pub],
        }),
      )
    }
    const p1 = await net.join('p1')
    const [h1, h2, h3] = holders as [AgentProc, AgentProc, AgentProc]
    await net.waitForFullMesh(['h1', 'p1'], 120_000)

    const size = opts.mib * 1024 * 1024
    const v1 = join(dir, 'v1.bin')
    const v2 = join(dir, 'v2.bin')
    await writeTestFile(v1, size)
    await writeVariant(v1, v2, 0.1)
    await ok(h1, ['image', 'push', v1, '--name', 'bench:v1', '--json'])

    // Let the direct path settle (it is negotiated after the link is up).
    const pathOf = async (from: AgentProc, to: string) => {
      const rows = (await from.json<{ peers: { name: string; path?: string; direct?: string }[] }>(['peers']))
        .peers
      const r = rows.find((x) => x.name === to)
      return r?.direct !== undefined ? 'direct-tcp' : `webrtc-${r?.path ?? 'none'}`
    }
    const deadline = Date.now() + 15_000
    let path = await pathOf(p1, 'h1')
    while (opts.direct && path !== 'direct-tcp' && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500))
      path = await pathOf(p1, 'h1')
    }
    log(`p1 → h1 bulk path: ${path}`)

    // Profiling toggles on SIGUSR2 (the process is `ip netns exec`'s, which execs node: same pid).
    const toggleProfile = () => {
      if (opts.cpuProfDir === undefined) return
      for (const a of [h1, p1]) a.child.kill('SIGUSR2')
    }
    const perf = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
      if (opts.perfDir === undefined) return fn()
      const out = join(opts.perfDir, `${name}.data`)
      const rec = spawn(
        'perf',
        ['record', '-F', '999', '-g', '-o', out, '-p', `${h1.child.pid},${p1.child.pid}`],
        {
          stdio: 'ignore',
        },
      )
      await new Promise((r) => setTimeout(r, 500))
      try {
        return await fn()
      } finally {
        const exited = new Promise((r) => rec.once('exit', r))
        rec.kill('SIGINT')
        await exited
        log(`perf: ${out} (h1 pid ${h1.child.pid}, p1 pid ${p1.child.pid})`)
      }
    }
    // The CLI's own start-up (a few seconds of tsx) comes before the agent's fetch: the pull command's
    // start is not in the window, only a little idle.
    toggleProfile()
    const pull1 = await withCpu(
      'pull',
      () => size / 1e6,
      [h1, p1],
      log,
      async () =>
        lastJson<PullResult>(await perf('pull', () => ok(p1, ['image', 'pull', 'bench:v1', '--json']))),
    )
    toggleProfile()
    if (opts.cpuProfDir !== undefined)
      log(`CPU profiles of h1 (pid ${h1.child.pid}) and p1 (pid ${p1.child.pid}) in ${opts.cpuProfDir}`)
    const fetchMBps = size / 1e6 / (pull1.elapsedMs / 1000)
    log(`fetch ${opts.mib} MiB from 1 holder: ${fetchMBps.toFixed(1)} MB/s (${pull1.elapsedMs} ms)`)
    const link = lastJson<{ mbps: number }>(await ok(p1, ['bench', 'h1', '--mib', '32', '--json']))
    log(`overlay link (WebRTC control channel): ${link.mbps.toFixed(1)} MB/s`)
    toggleProfile() // a second profile each: the plain stream, for comparison
    const tcpMiB = Math.min(opts.mib, 256)
    const tcp = await withCpu(
      'plain stream',
      () => (tcpMiB * 2 ** 20) / 1e6,
      [h1, p1],
      log,
      async () =>
        lastJson<{ mbps: number; path: string }>(
          await perf('stream', () =>
            ok(p1, ['bench', 'h1', '--over', 'libp2p', '--mib', String(tcpMiB), '--json']),
          ),
        ),
    )
    toggleProfile()
    log(`plain libp2p stream: ${tcp.mbps.toFixed(1)} MB/s (${tcp.path})`)
    if (opts.oneHolder === true) {
      return {
        fetchMBps: round(fetchMBps),
        fetch3MBps: 0,
        linkMBps: round(link.mbps),
        libp2pTcpMBps: round(tcp.mbps),
        dedupWireRatio: 0,
        engine: opts.engine,
        path,
        libp2pPath: tcp.path,
        fileMiB: opts.mib,
      }
    }

    // v2 shares 90% of its chunks with v1, which p1 now holds.
    await ok(h1, ['image', 'push', v2, '--name', 'bench:v2', '--json'])
    const pull2 = lastJson<PullResult>(await ok(p1, ['image', 'pull', 'bench:v2', '--json']))
    const dedupWireRatio = pull2.bytesFetched / (await stat(v2)).size
    log(
      `v2 pull: ${(pull2.bytesFetched / 2 ** 20).toFixed(1)} MiB fetched, ratio ${dedupWireRatio.toFixed(3)}`,
    )

    // Three holders, and a fresh puller (p1 holds v1 now and is stopped, so it is not a fourth).
    await p1.kill()
    // h2 and h3 pull it (a separate push would make a different image record: its own creation time).
    await net.waitForFullMesh(['h1', 'h2', 'h3'], 120_000)
    for (const h of [h2, h3]) await ok(h, ['image', 'pull', 'bench:v1', '--json'])
    const p2 = await net.join('p2')
    await net.waitForFullMesh(['h1', 'h2', 'h3', 'p2'], 120_000)
    const settle = Date.now() + 15_000
    while (opts.direct && Date.now() < settle) {
      const paths = await Promise.all(['h1', 'h2', 'h3'].map((h) => pathOf(p2, h)))
      if (paths.every((x) => x === 'direct-tcp')) break
      await new Promise((r) => setTimeout(r, 500))
    }
    const pull3 = lastJson<PullResult>(await ok(p2, ['image', 'pull', 'bench:v1', '--json']))
    const fetch3MBps = size / 1e6 / (pull3.elapsedMs / 1000)
    log(`fetch from 3 holders: ${fetch3MBps.toFixed(1)} MB/s (from ${pull3.from.length} member(s))`)

    return {
      fetchMBps: round(fetchMBps),
      fetch3MBps: round(fetch3MBps),
      linkMBps: round(link.mbps),
      libp2pTcpMBps: round(tcp.mbps),
      dedupWireRatio: round(dedupWireRatio, 4),
      engine: opts.engine,
      path,
      libp2pPath: tcp.path,
      fileMiB: opts.mib,
    }
  } finally {
    await net?.destroy()
    await rm(dir, { recursive: true, force: true })
  }
}
