/**
 * `npm run bench -- tunnel [--seconds N] [--no-link] [--no-hold] [--memory MiB] [--iperf-only] [--diag]
 * [--cpu-prof DIR]`: the L2 tunnel between
 * real agents across NAT'd clouds, in one run:
 *
 * - linkMBps: the raw link benchmark between two NAT'd clouds (test/bench/link.ts `--clouds`: werift,
 *   the agents' default link engine, between two processes), the baseline the tunnel rides on.
 * - the survival network (test/helpers/tunnel-survival.ts): `mesh` agents as processes in clouds a, b,
 *   c (VM hosts) and d (client with a host TAP port), b1 also with a TAP port, a QEMU guest on a1.
 * - rttMs: ping from d1's TAP to the guest on a1 through the tunnel (average of 10); on a WAN profile
 *   (`--profile P`) pathRttMs is the d↔a path's own RTT and rttAddedMs what the tunnel adds to it.
 * - iperfMBps: iperf3 TAP(d1) → TAP(b1) through the agents' tunnel (the guest image has no iperf3,
 *   and a TCG guest would measure QEMU's emulation rather than the tunnel).
 * - guestMBps: the guest's chargen service read from d1 (guest → tunnel → host TCP).
 * - survival: d1 streams through one TCP connection to the guest's echo service while the VM
 *   live-migrates a1→b1→c1→a1 with `mesh migrate`: moves, resets, the longest gap (maxGapMs; target
 *   ≤ 300) and each move's downtime. `--no-hold` runs the agents with MESH_TUNNEL_HOLD=0 (frames written
 *   into the paused QEMU, announce after adopt: the behaviour before holding) for comparison.
 *
 * Iterating on throughput: `--iperf-only` skips chargen and the survival run; `--diag` adds, for the
 * iperf3 run, the CPU share of d1's and b1's agents and of their TAP relays (socat), both switches'
 * counters and drops, and the load average; `--cpu-prof DIR` runs the agents with `--cpu-prof` and stops
 * d1's and b1's gracefully at the end so their profiles land in DIR. iperfRetransmits (TCP segments the
 * sender retransmitted) is always reported.
 */
import { readFileSync } from 'node:fs'
import { loadavg } from 'node:os'
import { fileURLToPath } from 'node:url'

import { CHARGEN_PORT } from '../../fixtures/guest/ports.ts'
import {
  createSurvivalNet,
  SURVIVAL_B_IP,
  SURVIVAL_GUEST_IP,
  type SurvivalNet,
  surviveMoves,
} from '../helpers/tunnel-survival.ts'

const CPU_PROF_PRELOAD = fileURLToPath(new URL('./_cpu-prof.cjs', import.meta.url))

const log = (s: string) => process.stderr.write(`[bench tunnel] ${s}\n`)

function arg(args: string[], name: string): string | undefined {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : undefined
}

const round2 = (x: number) => Math.round(x * 100) / 100

async function rtt(s: SurvivalNet): Promise<number | null> {
  const r = await s.client.host.exec(
    'busybox',
    ['ping', '-c', '10', '-i', '0.2', '-W', '5', SURVIVAL_GUEST_IP],
    {
      timeoutMs: 60_000,
    },
  )
  const m = /= [\d.]+\/([\d.]+)\//.exec(r.stdout)
  return m === null ? null : Number(m[1])
}

/** utime + stime of a process, in clock ticks (1/100 s), or 0 if it is gone. */
function cpuTicks(pid: number): number {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ')
    return Number(rest[11]) + Number(rest[12])
  } catch {
    return 0
  }
}

function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8')
      .trim()
      .split(/\s+/)
      .filter((x) => x !== '')
      .map(Number)
  } catch {
    return []
  }
}

/** CPU share (1 = one core) of d1's and b1's agents and their child processes while `run` runs. */
async function measureCpu<T>(s: SurvivalNet, run: () => Promise<T>): Promise<[T, Record<string, number>]> {
  const procs: Array<[string, number]> = []
  for (const n of ['d1', 'b1']) {
    const pid = s.net.agents.get(n)!.child.pid!
    procs.push([`${n}-agent`, pid])
    for (const c of childrenOf(pid)) procs.push([`${n}-child${c}`, c])
  }
  const before = procs.map(([, pid]) => cpuTicks(pid))
  const t0 = performance.now()
  const r = await run()
  const secs = (performance.now() - t0) / 1000
  const cpu: Record<string, number> = {}
  procs.forEach(([name, pid], i) => {
    cpu[name] = round2((cpuTicks(pid) - before[i]!) / 100 / secs)
  })
  return [r, cpu]
}

async function tunnelStatus(s: SurvivalNet, n: string): Promise<unknown> {
  try {
    const st = await s.net.agents.get(n)!.json<{ tunnel?: unknown }>(['status'], { timeoutMs: 30_000 })
    return st.tunnel
  } catch (err) {
    return String(err)
  }
}

/** Kernel counters in a member's namespace: UDP receive-buffer drops (the TAP relay's loopback
 *  datagrams, werift's socket) and the TAP's queue drops. */
async function kernelDrops(s: SurvivalNet, n: string): Promise<Record<string, number | string>> {
  const host = s.net.agents.get(n)!.host
  const out: Record<string, number | string> = {}
  const snmp = await host.exec('cat', ['/proc/net/snmp'], { timeoutMs: 10_000 })
  const udp = snmp.stdout.split('\n').filter((l) => l.startsWith('Udp:'))
  if (udp.length === 2) {
    const keys = udp[0]!.split(/\s+/)
    const vals = udp[1]!.split(/\s+/)
    for (const k of ['InErrors', 'RcvbufErrors', 'SndbufErrors'])
      out[`udp${k}`] = Number(vals[keys.indexOf(k)])
  }
  const tc = await host.exec('tc', ['-s', 'qdisc', 'show', 'dev', 'mesh0'], { timeoutMs: 10_000 })
  const m = /dropped (\d+)/.exec(tc.stdout)
  out.tapQdiscDropped = m === null ? tc.stdout.trim().slice(0, 200) : Number(m[1])
  return out
}

interface IperfResult {
  mbps: number | null
  retransmits: number | null
}

async function iperf(s: SurvivalNet, seconds: number): Promise<IperfResult> {
  const b1 = s.net.agents.get('b1')!.host
  const server = b1.exec('iperf3', ['-s', '-1', '-B', SURVIVAL_B_IP], { timeoutMs: (seconds + 60) * 1000 })
  await new Promise((r) => setTimeout(r, 1000))
  const c = await s.client.host.exec('iperf3', ['-c', SURVIVAL_B_IP, '-t', String(seconds), '-J'], {
    timeoutMs: (seconds + 60) * 1000,
  })
  await server
  try {
    const j = JSON.parse(c.stdout) as {
      end?: { sum_received?: { bits_per_second?: number }; sum_sent?: { retransmits?: number } }
    }
    const bps = j.end?.sum_received?.bits_per_second
    return {
      mbps: bps === undefined ? null : round2(bps / 8 / 1e6),
      retransmits: j.end?.sum_sent?.retransmits ?? null,
    }
  } catch {
    log(`iperf3 failed: ${c.stderr.slice(-500)} ${c.stdout.slice(-500)}`)
    return { mbps: null, retransmits: null }
  }
}

async function chargen(s: SurvivalNet, seconds: number): Promise<number | null> {
  const t0 = performance.now()
  const r = await s.client.host.exec(
    'sh',
    ['-c', `timeout ${seconds} nc ${SURVIVAL_GUEST_IP} ${CHARGEN_PORT} | wc -c`],
    { timeoutMs: (seconds + 30) * 1000 },
  )
  const bytes = Number(r.stdout.trim())
  const secs = (performance.now() - t0) / 1000
  return Number.isFinite(bytes) && bytes > 0 ? round2(bytes / secs / 1e6) : null
}

export async function main(args: string[]): Promise<Record<string, unknown>> {
  const seconds = Number(arg(args, '--seconds') ?? 5)
  const hold = !args.includes('--no-hold')
  const memoryMiB = Number(arg(args, '--memory') ?? 256)
  const iperfOnly = args.includes('--iperf-only')
  const diag = args.includes('--diag')
  const cpuProfDir = arg(args, '--cpu-prof')
  const notes: string[] = []
  let linkMBps: number | null = null
  if (!args.includes('--no-link')) {
    try {
      const { runLinkBench } = await import('./link.ts')
      log('raw link benchmark (werift, two processes in two NAT clouds)')
      linkMBps = round2((await runLinkBench(['--mib', '32', '--clouds'])).mbps)
      log(`link ${linkMBps} MB/s`)
    } catch (err) {
      notes.push(`link benchmark failed: ${err instanceof Error ? err.message : String(err)}`)
    }
  }
  log(
    `survival network: agents in clouds a, b, c (VM hosts) and d (client)${hold ? '' : ', MESH_TUNNEL_HOLD=0'}`,
  )
  const env: NodeJS.ProcessEnv = {
    ...(hold ? {} : { MESH_TUNNEL_HOLD: '0' }),
    ...(cpuProfDir === undefined
      ? {}
      : {
          NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --require ${CPU_PROF_PRELOAD}`.trim(),
          MESH_CPU_PROF_DIR: cpuProfDir,
        }),
  }
  const s = await createSurvivalNet({
    tapOnB: true,
    memoryMiB,
    log,
    ...(Object.keys(env).length === 0 ? {} : { env }),
  })
  try {
    const rttMs = await rtt(s)
    // On a WAN profile: the path's own RTT between the client's and the guest's clouds (router to
    // router, measured by the fixture at start), so what the tunnel adds is rttMs minus it.
    const m = s.net.topo.wan?.measured?.rtt.find(
      (x) => (x.from === 'd' && x.to === 'a') || (x.from === 'a' && x.to === 'd'),
    )
    const pathRttMs = m === undefined ? null : m.rttMs
    const rttAddedMs = rttMs === null || pathRttMs === null ? null : round2(rttMs - pathRttMs)
    log(`rtt ${rttMs} ms${pathRttMs === null ? '' : ` (path ${pathRttMs} ms, tunnel adds ${rttAddedMs} ms)`}`)
    log(`iperf3 TAP(d1) → TAP(b1), ${seconds} s`)
    const statusBefore = diag
      ? {
          d1: await tunnelStatus(s, 'd1'),
          b1: await tunnelStatus(s, 'b1'),
          kernel: { d1: await kernelDrops(s, 'd1'), b1: await kernelDrops(s, 'b1') },
        }
      : undefined
    const [ip, cpu] = await measureCpu(s, () => iperf(s, seconds))
    const load = loadavg().map(round2)
    const iperfMBps = ip.mbps
    log(`iperf ${iperfMBps} MB/s, ${ip.retransmits} retransmits, cpu ${JSON.stringify(cpu)}, load ${load}`)
    const diagOut = diag
      ? {
          cpu,
          load,
          statusBefore,
          statusAfter: {
            d1: await tunnelStatus(s, 'd1'),
            b1: await tunnelStatus(s, 'b1'),
            kernel: { d1: await kernelDrops(s, 'd1'), b1: await kernelDrops(s, 'b1') },
          },
        }
      : undefined
    if (cpuProfDir !== undefined) {
      for (const n of ['d1', 'b1']) {
        const c = s.net.agents.get(n)!.child
        const exited = new Promise((r) => c.once('exit', r))
        c.kill('SIGTERM')
        await Promise.race([exited, new Promise((r) => setTimeout(r, 15_000))])
      }
    }
    if (iperfOnly || cpuProfDir !== undefined)
      return {
        iperfMBps,
        linkMBps,
        rttMs,
        pathRttMs,
        rttAddedMs,
        iperfRetransmits: ip.retransmits,
        ratio: linkMBps === null || iperfMBps === null ? null : round2(iperfMBps / linkMBps),
        cpu,
        load,
        ...(diagOut === undefined ? {} : { diag: diagOut }),
        ...(notes.length > 0 ? { notes } : {}),
      }
    const guestMBps = await chargen(s, seconds)
    log(`guest chargen ${guestMBps} MB/s`)
    log('survival: stream to the guest while it live-migrates a1→b1→c1→a1')
    let survival: Record<string, unknown>
    try {
      const r = await surviveMoves(s, { log })
      survival = {
        moves: r.moves.length,
        resets: r.stream.resets,
        maxGapMs: r.stream.maxGapMs,
        downtimesMs: r.moves.map((m) => m.downtimeMs),
        gapsMs: r.moves.map((m) => m.gapMs),
        movesMs: r.moves.map((m) => m.totalMs),
        bytes: r.stream.bytesEchoed,
        exact: r.stream.bytesEchoed === r.stream.bytesSent && r.stream.mismatches === 0,
        hold,
      }
    } catch (err) {
      notes.push(`survival run failed: ${err instanceof Error ? err.message : String(err)}`)
      survival = { moves: null, resets: null, maxGapMs: null }
    }
    return {
      iperfMBps,
      linkMBps,
      rttMs,
      pathRttMs,
      rttAddedMs,
      survival,
      guestMBps,
      memoryMiB,
      ratio: linkMBps === null || iperfMBps === null ? null : round2(iperfMBps / linkMBps),
      iperfRetransmits: ip.retransmits,
      cpu,
      load,
      ...(diagOut === undefined ? {} : { diag: diagOut }),
      ...(notes.length > 0 ? { notes } : {}),
    }
  } finally {
    await s.destroy()
  }
}
