/**
 * `npm run bench -- scale [--agents 50] [--runs 3] [--per-cloud 5] [--idle-s 30] [--settle-s 10]
 *  [--pings 2] [--timeout-s 60] [-- agent args…]`: N agents in NAT'd clouds on this machine (10 clouds × 5
 * hosts for 50), all joined at once (test/helpers/scale-rig.ts says what is measured). Per run: time
 * until every member lists every other and every sampled `ping` (each member pings one member of its
 * cloud and one elsewhere) succeeded; RSS and CPU of each agent when idle; member-set gossip for the
 * whole join and for one more member. `mesh --help` and `mesh status` (against one of the N agents, while
 * they idle) are timed with bench cli's runner, 5 times each per run. Medians of the runs' medians.
 *
 * Last stdout line (via test/bench/main.ts):
 *   {"bench":"scale","agents":…,"joinAllMs":…,"rssMBMedian":…,"rssMBMax":…,"idleCpuPctMedian":…,
 *    "cliHelpMs":…,"cliStatusMs":…, …details}
 */
import { loadavg } from 'node:os'
import { median, runScale, type ScaleResult } from '../helpers/scale-rig.ts'
import { run as runMesh } from './cli.ts'

const log = (s: string) => process.stderr.write(`[bench scale] ${s}\n`)
const r1 = (x: number) => Math.round(x * 10) / 10

export async function main(args: string[]): Promise<Record<string, unknown>> {
  const dd = args.indexOf('--')
  const agentArgs = dd >= 0 ? args.slice(dd + 1) : []
  const own = dd >= 0 ? args.slice(0, dd) : args
  const opt = (name: string, def: number) => {
    const i = own.indexOf(name)
    if (i < 0) return def
    const v = Number(own[i + 1])
    if (!Number.isFinite(v) || v <= 0) throw new Error(`${name} needs a positive number`)
    return v
  }
  const agents = opt('--agents', 50)
  const runs = opt('--runs', 3)
  const perCloud = opt('--per-cloud', 5)
  const idleS = opt('--idle-s', 30)
  const settleS = opt('--settle-s', 10)
  const pings = opt('--pings', 2)
  const timeoutS = opt('--timeout-s', 60)
  const load0 = loadavg()[0]!
  // Builds dist/ if a source changed, so no run pays for it.
  await runMesh('dist', ['--version'])

  const results: (ScaleResult & { cliHelpMs: number; cliStatusMs: number })[] = []
  for (let r = 0; r < runs; r++) {
    log(`run ${r + 1}/${runs}: ${agents} agents`)
    const help: number[] = []
    const status: number[] = []
    const res = await runScale({
      agents,
      hostsPerCloud: perCloud,
      idleS,
      settleS,
      pingsPerMember: pings,
      reachTimeoutMs: timeoutS * 1000,
      agentArgs,
      log,
      async whileUp(_net, procs) {
        for (let i = 0; i < 5; i++) {
          help.push((await runMesh('dist', ['--help'])).ms)
          const a = procs[(i * 7) % procs.length]!
          const st = await runMesh('dist', ['status', '--json', '--state', a.state])
          JSON.parse(st.stdout) // a real answer
          status.push(st.ms)
        }
      },
    })
    results.push({ ...res, cliHelpMs: median(help), cliStatusMs: median(status) })
    const last = results.at(-1)!
    log(
      `run ${r + 1}: joinAll ${last.joinAllMs} ms, rss ${median(last.rssMB)}/${Math.max(...last.rssMB)} MB, cpu ${median(last.cpuPct)}%, help ${r1(last.cliHelpMs)} ms, status ${r1(last.cliStatusMs)} ms`,
    )
  }
  const med = (f: (r: (typeof results)[number]) => number) => r1(median(results.map(f)))
  return {
    agents,
    joinAllMs: med((r) => r.joinAllMs),
    rssMBMedian: med((r) => median(r.rssMB)),
    rssMBMax: med((r) => Math.max(...r.rssMB)),
    pssMBMedian: med((r) => median(r.pssMB)),
    pssMBMax: med((r) => Math.max(...r.pssMB)),
    idleCpuPctMedian: med((r) => median(r.cpuPct)),
    cliHelpMs: med((r) => r.cliHelpMs),
    cliStatusMs: med((r) => r.cliStatusMs),
    joinMs: med((r) => r.joinMs),
    reachMs: med((r) => r.reachMs),
    idleCpuPctMax: med((r) => Math.max(...r.cpuPct)),
    linksOpenMedian: med((r) => median(r.linksOpen)),
    linksBuiltTotal: med((r) => r.linksBuilt.reduce((a, b) => a + b, 0)),
    linkFailuresTotal: med((r) => r.linkFailures.reduce((a, b) => a + b, 0)),
    bootRssMB: med((r) => r.boot.rssMB),
    bootCpuPct: med((r) => r.boot.cpuPct),
    gossipPerJoin: {
      messages: med((r) => r.gossip.oneMore.sent),
      bytes: med((r) => r.gossip.oneMore.bytesOut),
    },
    targets: {
      joinAllMs: results.every((r) => r.joinAllMs <= 60_000),
      rssMB: results.every((r) => Math.max(...r.rssMB) <= 80),
      idleCpuPct: results.every((r) => median(r.cpuPct) <= 1),
    },
    runs: results.map((r) => ({
      joinMs: r.joinMs,
      reachMs: r.reachMs,
      joinAllMs: r.joinAllMs,
      pings: r.pings,
      rssMBMedian: median(r.rssMB),
      rssMBMax: Math.max(...r.rssMB),
      pssMBMedian: median(r.pssMB),
      pssMBMax: Math.max(...r.pssMB),
      cpuPctMedian: median(r.cpuPct),
      cpuPctMax: Math.max(...r.cpuPct),
      linksOpen: { median: median(r.linksOpen), max: Math.max(...r.linksOpen) },
      linksBuilt: { median: median(r.linksBuilt), max: Math.max(...r.linksBuilt) },
      boot: r.boot,
      gossip: r.gossip,
      cliHelpMs: r1(r.cliHelpMs),
      cliStatusMs: r1(r.cliStatusMs),
      load1: r.load1,
    })),
    agentArgs,
    load1: { start: load0, end: loadavg()[0]! },
  }
}
