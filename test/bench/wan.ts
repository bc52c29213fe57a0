/**
 * `npm run bench -- wan [--profile P[,P…]] [--runs N] [--cc cubic|bbr] [--seconds S] [--max-mib N]
 * [--engine werift|libdatachannel] [--tcp-congestion ALGO|default] [--kinds natNat,relay,…] [--cpu-prof DIR]`: the data plane on emulated WAN paths (fixtures/wan; default: all four
 * profiles, each in its own topology, one after the other).
 *
 * Per profile, one topology: NAT'd clouds a, b, d (cone) and s (symmetric) on that profile, bootstrap and
 * coturn on the internet ("in the middle"), one `mesh agent` per cloud; d1 is dialable (a forwarded port
 * announced, as a cloud VM with a public IP and an open port). The puller is b1. Bulk data is what mesh
 * moves in chunks (`mesh image pull` of fresh random data, so nothing is deduplicated), over whatever path
 * mesh picks for its bulk channels (`paths` says which: `tcp-punch`, `tcp-relay`, `tcp`, or
 * `webrtc-<ICE type>` when they stay on the WebRTC link):
 *   - natNatMBps: from a1 (cone ↔ cone: both NAT'd, neither dialable);
 *   - relayMBps:  from s1 (cone ↔ symmetric: no hole punching; a relay — TURN or the bootstrap);
 *   - directMBps: from d1 (one end dialable: the direct libp2p path);
 *   - linkMBps:   `mesh bench a1` (the WebRTC link's control channel, raw), for diagnosis;
 *   - linkTurnMBps: `mesh bench s1` (the WebRTC link to the symmetric member: over TURN), likewise;
 * and the same-run baselines between a1 and b1's namespaces, through both NATs (a1's port forwarded on
 * a's router for the test): one TCP stream with the hosts' default congestion control (`--cc`, default
 * cubic, as many cloud images ship; `tcpCc` says what the kernel actually used) and one with BBR
 * (iperf3 -R, a1 sending, `--seconds` long). Each transfer is sized to take about `--seconds` (probes
 * from 1 MiB up first, at most `--max-mib`). Every run measures each path once, in turns; the JSON holds the
 * medians of `--runs` (default 3) and every run. rttMs is the path RTT measured at start (router a to
 * router b, ICMP). emulatorCpuPct is the emulator's CPU (% of one core) while each path was measured.
 * The agents set their own congestion control on the sockets they own (`--tcp-congestion`, default
 * theirs: bbr); `--tcp-congestion default` leaves them on the hosts' (`--cc`). `--kinds` measures only
 * those. `--cpu-prof DIR` writes V8 CPU profiles of the first run's pulls to DIR (puller, holder, and the
 * bootstrap for the relay): DIR/<pid>-<n>.cpuprofile, n in the order of --kinds.
 *
 * Last line: {"bench":"wan","profiles":{"crosscloud":{"rttMs":…,"natNatMBps":…,"relayMBps":…,
 * "directMBps":…,"tcpMBps":…,"tcpBbrMBps":…,"path":"…",…},…}}
 */
import { readFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { type CongestionControl, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { type AgentProc, createTestnet, lastJson, type Testnet } from '../../fixtures/testnet/testnet.ts'
import { PROFILE_NAMES, type ProfileName, resolveProfile } from '../../fixtures/wan/profiles.ts'
import { writeTestFile } from '../../net/chunks/testing.ts'

const log = (s: string) => process.stderr.write(`[bench wan] ${s}\n`)
const DIRECT_PORT = 4101
const IPERF_PORT = 5201
const MiB = 1024 * 1024
const CPU_PROFILE_PRELOAD = fileURLToPath(new URL('./_cpu-profile.mjs', import.meta.url))

function arg(args: string[], name: string): string | undefined {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : undefined
}

const r2 = (x: number) => Math.round(x * 100) / 100

function median(xs: number[]): number {
  const s = xs.filter(Number.isFinite).sort((a, b) => a - b)
  if (s.length === 0) return Number.NaN
  const m = s.length >> 1
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

type Kind = 'natNat' | 'relay' | 'direct' | 'link' | 'linkTurn' | 'tcp' | 'tcpBbr'
const KINDS: Kind[] = ['natNat', 'relay', 'direct', 'link', 'linkTurn', 'tcp', 'tcpBbr']

export interface ProfileResult {
  rttMs: number
  natNatMBps: number
  relayMBps: number
  directMBps: number
  tcpMBps: number
  tcpBbrMBps: number
  /** The path mesh picked between the two NAT'd cone members' bulk channels. */
  path: string
  paths: { natNat: string; relay: string; direct: string }
  linkMBps: number
  linkTurnMBps: number
  /** ICE path of the WebRTC links measured by linkMBps / linkTurnMBps. */
  linkPaths: { link: string; linkTurn: string }
  tcpCc: string
  /** The agents' `--tcp-congestion` ('agent default' when not given). */
  agentCc: string
  /** Emulator CPU, % of one core, median over the runs, per measurement. */
  emulatorCpuPct: Record<Kind, number>
  /** The emulator's own fidelity over the whole run: queue overflows, release lateness (µs). */
  emulator: { overflows: number; lateMaxUs: number; lateMeanUs: number }
  /** What the topology measured at start: RTT per pair, rate per profile, loss counted. */
  measured: unknown
  runs: Record<Kind, number[]>
  /** CPU ms per MB moved (user + system, median over the runs) of the puller, the holder and the
   *  bootstrap (the relay) during each pull: load on the box changes MB/s far more than this. */
  cpuMsPerMB: Partial<Record<Kind, { puller: number; holder: number; boot: number }>>
  /** MiB moved per transfer, per kind (chosen from the probe). */
  mib: Partial<Record<Kind, number>>
  setupSeconds: number
  /** Seconds from `mesh join` to "agent ready" per member (one after the other), and then until all
   *  four see open links to each other (fullMesh). */
  joinSeconds: Record<string, number>
  load: number[]
}

interface Ctx {
  net: Testnet
  puller: AgentProc
  holders: { natNat: AgentProc; relay: AgentProc; direct: AgentProc }
  dir: string
  seconds: number
  maxMiB: number
  seq: number
}

async function ok(a: AgentProc, args: string[], timeoutMs = 900_000): Promise<string> {
  const r = await a.mesh(args, { timeoutMs })
  if (r.code !== 0)
    throw new Error(`${a.name}: mesh ${args.join(' ')} failed (${r.code}): ${r.stderr.slice(-800)}`)
  return r.stdout
}

async function pathTo(from: AgentProc, to: string): Promise<string> {
  const rows = (
    await from.json<{
      peers: { name: string; path?: string; direct?: string; bulk?: string; link: string }[]
    }>(['peers'])
  ).peers
  const r = rows.find((x) => x.name === to)
  if (r === undefined || r.link !== 'open') return 'none'
  // Bulk channels on a TCP path (direct dial, hole punch, bootstrap relay) or on the WebRTC link.
  if (r.bulk !== undefined) return `${r.bulk}`
  return r.direct !== undefined ? 'direct-tcp' : `webrtc-${r.path ?? '?'}`
}

async function linkPathTo(from: AgentProc, to: string): Promise<string> {
  const rows = (await from.json<{ peers: { name: string; path?: string; link: string }[] }>(['peers'])).peers
  const r = rows.find((x) => x.name === to)
  return r === undefined || r.link !== 'open' ? 'none' : (r.path ?? '?')
}

/** CPU seconds (user + system) a process has used so far; 0 when it is gone. */
function cpuSecondsOf(pid: number | undefined): number {
  if (pid === undefined) return 0
  try {
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(f[11]) + Number(f[12])) / 100
  } catch {
    return 0
  }
}

/** Pulls `mib` MiB of fresh random data that only `holder` has; returns MB/s as the agent timed it. */
async function pull(c: Ctx, holder: AgentProc, mib: number, beforePull?: () => void): Promise<number> {
  const name = `wan${c.seq++}`
  const file = join(c.dir, `${name}.bin`)
  await writeTestFile(file, Math.round(mib * MiB))
  await ok(holder, ['image', 'push', file, '--name', `${name}:v1`, '--json'])
  await rm(file, { force: true })
  beforePull?.()
  const res = lastJson<{ bytesFetched: number; elapsedMs: number }>(
    await ok(c.puller, ['image', 'pull', `${name}:v1`, '--json']),
  )
  return res.bytesFetched / 1e6 / (res.elapsedMs / 1000)
}

/** `mesh bench PEER`: the WebRTC link itself (control channel), to a1 or (turn) to the symmetric s1. */
async function linkBench(c: Ctx, mib: number, turn = false): Promise<number> {
  const r = lastJson<{ mbps: number }>(
    await ok(c.puller, [
      'bench',
      (turn ? c.holders.relay : c.holders.natNat).name,
      '--mib',
      String(Math.max(1, Math.round(mib))),
      '--json',
    ]),
  )
  return r.mbps
}

/** iperf3 from the puller's namespace to a1 (through a's forwarded port), a1 sending. */
async function tcp(c: Ctx, publicIp: string, cc: string | undefined): Promise<{ mbps: number; cc: string }> {
  const a1 = c.holders.natNat
  const server = a1.host.spawn('iperf3', ['-s', '-1', '--forceflush', '-p', String(IPERF_PORT)])
  try {
    await waitForLine(server, /Server listening/, 10_000)
    const r = await c.puller.host.exec(
      'iperf3',
      [
        '-c',
        publicIp,
        '-p',
        String(IPERF_PORT),
        '-R',
        '-t',
        String(c.seconds),
        '-J',
        ...(cc === undefined ? [] : ['-C', cc]),
      ],
      { timeoutMs: (c.seconds + 60) * 1000 },
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

async function benchProfile(
  profile: ProfileName,
  o: {
    runs: number
    cc: CongestionControl
    seconds: number
    maxMiB: number
    engine: string
    agentCc: string | undefined
    kinds: Kind[]
    cpuProfDir: string | undefined
  },
): Promise<ProfileResult> {
  const t0 = Date.now()
  const dir = await mkdtemp(join(tmpdir(), 'bench-wan-'))
  log(
    `${profile}: building clouds a, b, d (cone), s (symmetric) on ${profile}, hosts' congestion control ${o.cc}`,
  )
  const net = await createTestnet({
    clouds: [
      { name: 'a', nat: 'cone', cc: o.cc },
      { name: 'b', nat: 'cone', cc: o.cc },
      { name: 'd', nat: 'cone', cc: o.cc },
      { name: 's', nat: 'symmetric', cc: o.cc },
    ],
    turn: true,
    noJoin: true,
    profile,
    measureWan: 'full',
    ...(o.cpuProfDir === undefined
      ? {}
      : {
          env: {
            NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --import=${CPU_PROFILE_PRELOAD}`.trim(),
            MESH_CPU_PROFILE_DIR: o.cpuProfDir,
          },
        }),
    agentArgs: ['--engine', o.engine, ...(o.agentCc === undefined ? [] : ['--tcp-congestion', o.agentCc])],
    log: (l) => log(`${profile}: ${l}`),
  })
  try {
    // Join time: `mesh join` (invite through the bootstrap) until the agent says it is ready, one member
    // after the other; then until every member has an open link to every other.
    const joinSeconds: Record<string, number> = {}
    const timed = async (name: string, o?: { args: string[] }) => {
      const j0 = Date.now()
      const a = await net.join(name, o)
      joinSeconds[name] = r2((Date.now() - j0) / 1000)
      return a
    }
    const a1 = await timed('a1')
    const b1 = await timed('b1')
    const s1 = await timed('s1')
    const pub = await net.topo.cloud('d').forwardTcp(DIRECT_PORT)
    const d1 = await timed('d1', {
      args: ['--listen', `/ip4/0.0.0.0/tcp/${DIRECT_PORT}`, '--announce', pub],
    })
    const m0 = Date.now()
    await net.waitForFullMesh(['a1', 'b1', 's1', 'd1'], 240_000)
    joinSeconds.fullMesh = r2((Date.now() - m0) / 1000)
    log(`${profile}: join ${JSON.stringify(joinSeconds)} s`)
    // TCP paths for the bulk channels (direct dial, hole punch, relay) are set up after the link is up:
    // give them 30 s; what is still on WebRTC then is what mesh picked.
    const readPaths = async () => ({
      natNat: await pathTo(b1, 'a1'),
      relay: await pathTo(b1, 's1'),
      direct: await pathTo(b1, 'd1'),
    })
    let paths = await readPaths()
    const deadline = Date.now() + 30_000
    while (Object.values(paths).some((x) => x.startsWith('webrtc')) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 1000))
      paths = await readPaths()
    }
    const linkPaths = { link: await linkPathTo(b1, 'a1'), linkTurn: await linkPathTo(b1, 's1') }
    log(
      `${profile}: bulk paths from b1: a1 ${paths.natNat}, s1 ${paths.relay}, d1 ${paths.direct}; WebRTC links: a1 ${linkPaths.link}, s1 ${linkPaths.linkTurn}`,
    )
    const aPublic = net.topo.cloud('a').publicIp
    await net.topo.cloud('a').forwardTcp(IPERF_PORT)
    const setupSeconds = (Date.now() - t0) / 1000

    const c: Ctx = {
      net,
      puller: b1,
      holders: { natNat: a1, relay: s1, direct: d1 },
      dir,
      seconds: o.seconds,
      maxMiB: o.maxMiB,
      seq: 0,
    }
    // Sizes: probes from 1 MiB up (a short transfer is all slow start and command start-up), until one
    // lasts a third of `seconds`; the runs then move what the last probe's rate moves in `seconds`.
    const mib: Partial<Record<Kind, number>> = {}
    const sizeFor = (rate: number) =>
      Math.max(1, Math.min(o.maxMiB, Math.round((rate * 1e6 * o.seconds) / MiB)))
    for (const k of (['natNat', 'relay', 'direct', 'link', 'linkTurn'] as const).filter((x) =>
      o.kinds.includes(x),
    )) {
      let size = 1
      for (let probe = 0; ; probe++) {
        const rate =
          k === 'link' || k === 'linkTurn'
            ? await linkBench(c, size, k === 'linkTurn')
            : await pull(c, c.holders[k], size)
        const secs = (size * MiB) / 1e6 / rate
        log(`${profile}: ${k} probe ${size} MiB: ${r2(rate)} MB/s (${r2(secs)} s)`)
        const next = sizeFor(rate)
        if (secs >= o.seconds / 3 || size >= o.maxMiB || probe === 3 || next <= size) {
          mib[k] = next
          break
        }
        size = Math.max(next, size * 4)
        size = Math.min(size, o.maxMiB)
      }
      log(`${profile}: ${k}: ${mib[k]} MiB per run`)
    }

    const runs = Object.fromEntries(KINDS.map((k) => [k, []])) as unknown as Record<Kind, number[]>
    const cpu = Object.fromEntries(KINDS.map((k) => [k, []])) as unknown as Record<Kind, number[]>
    let tcpCc = '?'
    // --cpu-prof: the first run's pulls are profiled in the puller, the holder and (relay) the bootstrap.
    const profiled = (k: Kind) =>
      k === 'natNat' || k === 'direct' ? [b1, c.holders[k]] : k === 'relay' ? [b1, s1, net.boot] : []
    const cpuRuns: Partial<Record<Kind, { puller: number[]; holder: number[]; boot: number[] }>> = {}
    const roles = (k: 'natNat' | 'relay' | 'direct') => ({ puller: b1, holder: c.holders[k], boot: net.boot })
    const toggleProfile = (k: Kind) => {
      for (const a of profiled(k)) if (a.child.pid !== undefined) process.kill(a.child.pid, 'SIGUSR2')
    }
    for (let run = 1; run <= o.runs; run++) {
      for (const k of KINDS.filter((x) => o.kinds.includes(x))) {
        const prof = o.cpuProfDir !== undefined && run === 1
        if (prof) toggleProfile(k)
        const c0 = net.topo.wan?.cpuSeconds() ?? 0
        const w0 = Date.now()
        let v: number
        if (k === 'tcp' || k === 'tcpBbr') {
          const r = await tcp(c, aPublic, k === 'tcpBbr' ? 'bbr' : undefined)
          v = r.mbps
          if (k === 'tcp') tcpCc = r.cc
        } else if (k === 'link' || k === 'linkTurn') {
          v = await linkBench(c, mib[k]!, k === 'linkTurn')
        } else {
          const who = roles(k)
          let before: number[] = []
          v = await pull(c, c.holders[k], mib[k]!, () => {
            before = Object.values(who).map((a) => cpuSecondsOf(a.child.pid))
          })
          const mb = (mib[k]! * MiB) / 1e6
          const r = cpuRuns[k] ?? { puller: [], holder: [], boot: [] }
          cpuRuns[k] = r
          Object.values(who).forEach((a, j) => {
            const role = (['puller', 'holder', 'boot'] as const)[j]!
            r[role].push(r2(((cpuSecondsOf(a.child.pid) - before[j]!) * 1000) / mb))
          })
        }
        const secs = (Date.now() - w0) / 1000
        if (prof) toggleProfile(k)
        runs[k].push(r2(v))
        cpu[k].push(r2((((net.topo.wan?.cpuSeconds() ?? 0) - c0) / secs) * 100))
        log(`${profile} run ${run}: ${k} ${r2(v)} MB/s (emulator CPU ${cpu[k].at(-1)}% of a core)`)
      }
    }
    const stats = (await net.topo.wan?.stats()) ?? []
    const qs = stats.flatMap((x) => [x.up, x.down])
    const released = qs.reduce((s, q) => s + q.packets - q.lost, 0)
    const emulator = {
      overflows: qs.reduce((s, q) => s + q.overflow, 0),
      lateMaxUs: r2(Math.max(0, ...qs.map((q) => q.lateMaxUs))),
      // Mean over all queues, each weighted by the packets it kept (about what it released).
      lateMeanUs: r2(
        released > 0 ? qs.reduce((s, q) => s + q.lateMeanUs * (q.packets - q.lost), 0) / released : 0,
      ),
    }
    log(
      `${profile}: emulator queue overflows ${emulator.overflows}, release late by ${emulator.lateMeanUs} µs on average, ${emulator.lateMaxUs} µs at most`,
    )
    const rtt = net.topo.wan?.measured?.rtt.find((x) => x.from === 'a' && x.to === 'b')?.rttMs
    return {
      rttMs: rtt ?? 0,
      natNatMBps: r2(median(runs.natNat)),
      relayMBps: r2(median(runs.relay)),
      directMBps: r2(median(runs.direct)),
      tcpMBps: r2(median(runs.tcp)),
      tcpBbrMBps: r2(median(runs.tcpBbr)),
      path: paths.natNat,
      paths,
      linkMBps: r2(median(runs.link)),
      linkTurnMBps: r2(median(runs.linkTurn)),
      linkPaths,
      tcpCc,
      agentCc: o.agentCc ?? 'agent default',
      emulatorCpuPct: Object.fromEntries(KINDS.map((k) => [k, r2(median(cpu[k]))])) as Record<Kind, number>,
      emulator,
      measured: net.topo.wan?.measured,
      runs,
      cpuMsPerMB: Object.fromEntries(
        Object.entries(cpuRuns).map(([k, r]) => [
          k,
          { puller: r2(median(r.puller)), holder: r2(median(r.holder)), boot: r2(median(r.boot)) },
        ]),
      ),
      mib,
      setupSeconds: r2(setupSeconds),
      joinSeconds,
      load: loadavg().map(r2),
    }
  } finally {
    await net.destroy()
    await rm(dir, { recursive: true, force: true })
  }
}

export async function main(args: string[]): Promise<Record<string, unknown>> {
  const list = (arg(args, '--profile') ?? PROFILE_NAMES.join(',')).split(',').map((s) => s.trim())
  for (const p of list) resolveProfile(p)
  const runs = Number(arg(args, '--runs') ?? 3)
  const cc = (arg(args, '--cc') ?? 'cubic') as CongestionControl
  if (!['cubic', 'bbr', 'reno'].includes(cc)) throw new Error(`--cc: cubic, bbr or reno, not ${cc}`)
  const seconds = Number(arg(args, '--seconds') ?? 8)
  const maxMiB = Number(arg(args, '--max-mib') ?? 256)
  const engine = arg(args, '--engine') ?? 'werift'
  const agentCc = arg(args, '--tcp-congestion')
  const kinds = (arg(args, '--kinds')?.split(',') ?? KINDS) as Kind[]
  for (const k of kinds) if (!KINDS.includes(k)) throw new Error(`--kinds: ${KINDS.join(',')}, not ${k}`)
  const cpuProfDir = arg(args, '--cpu-prof')
  if (!(runs >= 1 && seconds >= 1 && maxMiB >= 1))
    throw new Error('--runs, --seconds and --max-mib must be ≥ 1')
  const profiles: Record<string, ProfileResult> = {}
  for (const p of list) {
    log(`profile ${p}: load ${loadavg().map(r2).join(' ')}`)
    profiles[p] = await benchProfile(p as ProfileName, {
      runs,
      cc,
      seconds,
      maxMiB,
      engine,
      agentCc,
      kinds,
      cpuProfDir,
    })
    const r = profiles[p]!
    log(
      `profile ${p}: rtt ${r.rttMs} ms; natNat ${r.natNatMBps} (${r.path}), relay ${r.relayMBps}, direct ${r.directMBps}, link ${r.linkMBps} / TURN ${r.linkTurnMBps}; tcp ${r.tcpCc} ${r.tcpMBps}, bbr ${r.tcpBbrMBps} MB/s`,
    )
  }
  return { profiles, engine, runs, seconds }
}
