/**
 * The scale rig: N `mesh` agents in NAT'd clouds on this machine (fixtures/testnet), all joined at
 * once, then measured the way an operator judges a fleet:
 *
 *   joinMs      from the first `mesh join` until every agent lists every other member (membership)
 *   reachMs     from the first `mesh join` until every sampled `ping` succeeded: each member pings
 *               `pingsPerMember` others (one in its own cloud, the rest in other clouds, every member
 *               pinged as often as it pings), over the data plane as `mesh ping` does
 *   joinAllMs   the later of the two
 *   rssMB, cpuPct  per agent after `settleS` s of quiet, CPU over an `idleS` s window (/proc)
 *   pssMB       per agent: its proportional share (smaps_rollup Pss). RSS counts the ~35-50 MB of the
 *               node binary's pages that every agent maps and the box holds once; PSS divides them.
 *   gossip      member-set messages and bytes (sum over all agents) for the whole join and for one
 *               more member joining the quiet mesh
 *   linksBuilt  links each agent saw come up (its 'link up' log lines) until reachMs, and link
 *               attempts that failed: what the join cost in DTLS/SCTP handshakes
 *
 * Used by `npm run bench -- scale` (full size) and test/system/scale-e2e.test.ts (reduced, in CI).
 * Agents are driven through their control sockets from this process (a CLI start per poll would cost
 * more CPU than the agents being measured).
 */
import { readFileSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { loadavg } from 'node:os'
import { join } from 'node:path'
import { waitForLine } from '../../fixtures/testnet/clouds.ts'
import { type AgentProc, createTestnet, type Testnet } from '../../fixtures/testnet/testnet.ts'
import type { PeerRow } from '../../src/control/api.ts'
import { type ControlClient, connectControl } from '../../src/control/client.ts'

export interface ScaleOptions {
  agents: number
  /** Hosts per cloud (default 5: 50 agents = 10 clouds × 5). */
  hostsPerCloud?: number
  /** Quiet time before the idle window (s). */
  settleS?: number
  /** Length of the idle CPU window (s). */
  idleS?: number
  /** Give up on membership/reachability after this long (ms from the first join). */
  reachTimeoutMs?: number
  /** Pings each member sends (each to a different member). */
  pingsPerMember?: number
  /** Extra `mesh agent` arguments for every member. */
  agentArgs?: string[]
  /** Extra environment for every agent. */
  env?: NodeJS.ProcessEnv
  log?: (line: string) => void
  /** Runs while the mesh is up and idle, after the measurements (e.g. CLI timings). */
  whileUp?: (net: Testnet, agents: AgentProc[]) => Promise<void>
  /** When some member holds more than `bound` links at the idle sample, sample again every second until
   *  none does or `withinMs` passed (links a member built to ring neighbours that a slow join storm
   *  shifted close once idle for the supervisor's link idle time). The result's linksOpen is the last
   *  sample; linksOpenIdle the first. */
  linksSettle?: { bound: number; withinMs: number }
}

export interface GossipCounters {
  sent: number
  received: number
  bytesOut: number
  bytesIn: number
}

export interface ScaleResult {
  agents: number
  clouds: number
  joinMs: number
  reachMs: number
  joinAllMs: number
  pings: { ok: number; failedAttempts: number; msMedian: number; msMax: number }
  rssMB: number[]
  pssMB: number[]
  cpuPct: number[]
  boot: { rssMB: number; cpuPct: number }
  linksOpen: number[]
  /** Links open at the idle sample, before any linksSettle wait, and how long that wait took (ms). */
  linksOpenIdle: number[]
  linksSettledMs: number
  /** Per agent, until reachMs: links that came up, link attempts that failed (from its log). */
  linksBuilt: number[]
  linkFailures: number[]
  gossip: { join: GossipCounters; oneMore: GossipCounters & { agents: number } }
  load1: { start: number; idle: number }
}

export const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  if (s.length === 0) return Number.NaN
  const m = s.length >> 1
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

const CLK_TCK = 100

/** utime + stime of a process in seconds. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK
}

function pssMB(pid: number): number {
  const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))
  if (m === null) throw new Error(`no Pss for ${pid}`)
  return Number(m[1]) / 1024
}

function rssMB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  if (m === null) throw new Error(`no VmRSS for ${pid}`)
  return Number(m[1]) / 1024
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** A control call that gives up after `ms` (the client's own signal only cancels on the agent's side,
 *  and a call to an agent that died would wait forever). */
function call(c: ControlClient, method: string, params: unknown = {}, ms = 20_000): Promise<unknown> {
  let timer: NodeJS.Timeout | undefined
  const ac = new AbortController()
  return Promise.race([
    c.call(method, params, { signal: ac.signal }),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        ac.abort()
        reject(new Error(`${method} got no answer within ${ms} ms`))
      }, ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

/** The last lines of every agent that is no longer running (for a failed run's message). */
function deadAgents(procs: AgentProc[]): string {
  return procs
    .filter((a) => a.child.exitCode !== null || a.child.signalCode !== null)
    .map(
      (a) =>
        `--- ${a.name} exited (${a.child.exitCode ?? a.child.signalCode}):\n${a.log().split('\n').slice(-15).join('\n')}`,
    )
    .join('\n')
}

interface NetStatus {
  net: { members: number; linksOpen: number; gossip?: GossipCounters }
}

async function gossipSum(clients: ControlClient[]): Promise<GossipCounters> {
  const sum: GossipCounters = { sent: 0, received: 0, bytesOut: 0, bytesIn: 0 }
  for (const c of clients) {
    const st = (await call(c, 'status')) as NetStatus
    const g = st.net.gossip
    if (g === undefined) continue
    sum.sent += g.sent
    sum.received += g.received
    sum.bytesOut += g.bytesOut
    sum.bytesIn += g.bytesIn
  }
  return sum
}

const minus = (a: GossipCounters, b: GossipCounters): GossipCounters => ({
  sent: a.sent - b.sent,
  received: a.received - b.received,
  bytesOut: a.bytesOut - b.bytesOut,
  bytesIn: a.bytesIn - b.bytesIn,
})

/** Which members each member pings: one in its own cloud (when it has company), the rest elsewhere;
 *  built from rotations, so every member is pinged as often as it pings. */
export function pingPlan(names: string[][], perMember: number): [string, string][] {
  const flat = names.flat()
  const n = flat.length
  const perCloud = names[0]?.length ?? 1
  const pairs: [string, string][] = []
  let rounds = 0
  // The next host of the same cloud (a rotation inside each cloud).
  if (perCloud > 1 && perMember > 0) {
    for (const cloud of names)
      for (const [hi, from] of cloud.entries()) pairs.push([from, cloud[(hi + 1) % cloud.length]!])
    rounds++
  }
  // Rotations of the cloud-major list by k clouds and k hosts: member i pings i+s, a host k clouds on.
  for (let k = 1; rounds < perMember && k < n; k++) {
    const s = (k * perCloud + k) % n
    if (s === 0) continue
    for (const [i, from] of flat.entries()) pairs.push([from, flat[(i + s) % n]!])
    rounds++
  }
  return pairs
}

export async function runScale(opts: ScaleOptions): Promise<ScaleResult> {
  const log = opts.log ?? ((l: string) => process.stderr.write(`[scale] ${l}\n`))
  const perCloud = opts.hostsPerCloud ?? 5
  const nClouds = Math.ceil(opts.agents / perCloud)
  const reachTimeoutMs = opts.reachTimeoutMs ?? 60_000
  const clouds = Array.from({ length: nClouds }, (_, i) => ({
    name: `c${i}`,
    nat: 'cone' as const,
    hosts: Array.from({ length: Math.min(perCloud, opts.agents - i * perCloud) }, (_, k) => `c${i}h${k}`),
  }))
  const load0 = loadavg()[0]!
  const t0build = Date.now()
  const net = await createTestnet({
    clouds,
    noJoin: true,
    measureWan: false,
    internetHosts: ['late'],
    ...(opts.agentArgs === undefined ? {} : { agentArgs: opts.agentArgs }),
    ...(opts.env === undefined ? {} : { env: opts.env }),
  })
  const clients: ControlClient[] = []
  const started: AgentProc[] = []
  try {
    log(
      `topology: ${nClouds} clouds, ${opts.agents} hosts, ${net.topo.namespaces().length} namespaces, built in ${Date.now() - t0build} ms`,
    )
    const names = clouds.map((c) => c.hosts)
    const invites: string[] = []
    for (let i = 0; i < opts.agents + 1; i++) invites.push(await net.invite({ ttl: '1h' }))
    log(`${invites.length} invites made`)

    // ---- join everyone at once
    const t0 = Date.now()
    const agents = await Promise.all(
      names.flat().map((h, i) => net.join(h, { invite: invites[i]!, waitReady: false })),
    )
    started.push(...agents)
    const deadline = t0 + reachTimeoutMs
    await Promise.all(agents.map((a) => waitForLine(a.child, /agent ready/, reachTimeoutMs)))
    log(`all ${agents.length} agents ready after ${Date.now() - t0} ms`)
    for (const a of agents) clients.push(await connectControl(join(a.state, 'control.sock')))
    const byName = new Map(agents.map((a, i) => [a.name, clients[i]!]))
    const others = agents.length // every member but itself: the other agents and the bootstrap

    // Where the box's CPU went since the first join: the bootstrap (relay, admissions) vs the agents.
    const bootPid0 = net.boot.child.pid!
    const agentPids = agents.map((a) => a.child.pid!)
    const bootCpu0 = cpuSeconds(bootPid0)
    const agentsCpu0 = agentPids.map(cpuSeconds)
    const cpuShares = () => {
      const wall = (Date.now() - t0) / 1000
      const boot = cpuSeconds(bootPid0) - bootCpu0
      let all = 0
      for (const [i, p] of agentPids.entries()) {
        try {
          all += cpuSeconds(p) - agentsCpu0[i]!
        } catch {
          // an agent that exited: its CPU is gone with it
        }
      }
      return `bootstrap ${Math.round((boot / wall) * 100)} % of a core, agents ${Math.round((all / wall) * 100)} % (sum), load ${loadavg()[0]!.toFixed(1)}`
    }
    let joinMs = -1
    const membership = (async () => {
      const seen = new Array<boolean>(agents.length).fill(false)
      const listed = new Array<number>(agents.length).fill(0)
      let progressAt = t0
      for (;;) {
        await Promise.all(
          clients.map(async (c, i) => {
            if (seen[i]) return
            const r = (await call(c, 'peers')) as { peers: PeerRow[] }
            listed[i] = r.peers.length
            if (r.peers.length >= others) seen[i] = true
          }),
        )
        if (Date.now() - progressAt >= 10_000) {
          // The shape of the join: a slow tail or everyone slow.
          progressAt = Date.now()
          log(
            `  ${Math.round((progressAt - t0) / 1000)} s: members listed min ${Math.min(...listed)} median ${median(listed)} of ${others}, ${seen.filter(Boolean).length} complete; CPU since the join: ${cpuShares()}`,
          )
        }
        if (seen.every(Boolean)) {
          joinMs = Date.now() - t0
          log(`membership complete after ${joinMs} ms; CPU since the join: ${cpuShares()}`)
          return
        }
        if (Date.now() > deadline) {
          const missing = agents.filter((_, i) => !seen[i])
          const detail = await Promise.all(
            missing.slice(0, 2).map(async (a) => {
              const r = (await call(byName.get(a.name)!, 'peers').catch(() => ({ peers: [] }))) as {
                peers: PeerRow[]
              }
              const lines = a
                .log()
                .split('\n')
                .filter((l) => /member|gossip|admission|admit|fail|error|warn/i.test(l))
                .slice(-15)
                .join('\n')
              return `--- ${a.name} lists ${r.peers.length} of ${others}:\n${lines}`
            }),
          )
          throw new Error(
            `membership not complete after ${reachTimeoutMs} ms: ${missing.map((a) => a.name).join(',')}\n${detail.join('\n')}`,
          )
        }
        await sleep(500)
      }
    })()

    // ---- reachability: every planned ping succeeds (retried until the deadline)
    const plan = pingPlan(names, opts.pingsPerMember ?? 2)
    let failedAttempts = 0
    const pingMs: number[] = []
    let reachMs = -1
    const reach = (async () => {
      await Promise.all(
        plan.map(async ([from, to]) => {
          const c = byName.get(from)!
          for (;;) {
            const t = Date.now()
            try {
              await call(c, 'ping', { peer: to, count: 1 }, 20_000)
              pingMs.push(Date.now() - t)
              return
            } catch (err) {
              failedAttempts++
              if (Date.now() > deadline) {
                const fromLog = agents
                  .find((a) => a.name === from)
                  ?.log()
                  .split('\n')
                  .filter((l) => /link|ping|fail|error/i.test(l))
                  .slice(-8)
                  .join('\n')
                throw new Error(
                  `${from} cannot ping ${to} within ${reachTimeoutMs} ms: ${(err as Error).message}; membership ${joinMs < 0 ? 'not yet complete' : `complete after ${joinMs} ms`}; ${from}'s last link lines:\n${fromLog}`,
                )
              }
              await sleep(1000)
            }
          }
        }),
      )
      reachMs = Date.now() - t0
      log(`every ping answered after ${reachMs} ms; CPU since the join: ${cpuShares()}`)
    })()
    await Promise.all([membership, reach])
    const joinAllMs = Math.max(joinMs, reachMs)
    const logs = agents.map((a) => a.log())
    // Each agent's log up to here, for a closer look at a slow join (MESH_SCALE_LOGS=dir).
    const logDir = process.env.MESH_SCALE_LOGS
    if (logDir !== undefined) {
      await mkdir(logDir, { recursive: true })
      for (const [i, a] of agents.entries()) await writeFile(join(logDir, `${a.name}.log`), logs[i]!)
      await writeFile(join(logDir, 'boot.log'), net.boot.log())
    }
    const count = (re: RegExp) => logs.map((l) => l.split('\n').filter((x) => re.test(x)).length)
    const linksBuilt = count(/\blink up\b/)
    const linkFailures = count(/link attempt to \S+ failed|link from \S+ failed/)
    const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0)
    // Why link attempts (and relay reservations) failed, most frequent first (ids and numbers masked).
    const why = new Map<string, number>()
    for (const l of logs.flatMap((x) => x.split('\n')))
      if (/link attempt to \S+ failed|link from \S+ failed|relay reservation on \S+ failed/.test(l)) {
        const k = l
          .replace(/^.*?(link attempt to|link from|relay reservation on)/, '$1')
          .replace(/\/ip4\/\S+/g, 'A')
          .replace(/12D3Koo\w+/g, 'P')
          .replace(/\d+/g, 'N')
          .replace(/Some configured addresses failed to be listened on.*?\(/, '(')
          .slice(0, 160)
        why.set(k, (why.get(k) ?? 0) + 1)
      }
    for (const [k, v] of [...why].sort((a, b) => b[1] - a[1]).slice(0, 8)) log(`  ${v}× ${k}`)
    log(
      `membership ${joinMs} ms, ${plan.length} pings ok ${reachMs} ms (${failedAttempts} failed attempts); links built ${sum(linksBuilt)} (median ${median(linksBuilt)}, max ${Math.max(...linksBuilt)} per agent), ${sum(linkFailures)} link attempts failed`,
    )

    // ---- gossip: the join as a whole, then one more member on the quiet mesh
    await sleep((opts.settleS ?? 10) * 1000)
    const gJoin = await gossipSum(clients)
    const late = await net.join('late', { invite: invites[opts.agents]! })
    started.push(late)
    const lateClient = await connectControl(join(late.state, 'control.sock'))
    clients.push(lateClient)
    const lateDeadline = Date.now() + reachTimeoutMs
    for (;;) {
      let all = true
      for (const c of clients) {
        const r = (await call(c, 'peers')) as { peers: PeerRow[] }
        if (r.peers.length < others + 1) all = false
      }
      if (all) break
      if (Date.now() > lateDeadline) throw new Error('the late member did not reach every member')
      await sleep(500)
    }
    await sleep(5000) // let the gossip that follows settle
    const gAfter = await gossipSum(clients)
    const oneMore = { ...minus(gAfter, gJoin), agents: clients.length }
    log(`gossip: join ${JSON.stringify(gJoin)}; one more member ${JSON.stringify(oneMore)}`)

    // ---- idle
    await sleep((opts.settleS ?? 10) * 1000)
    const procs = [...agents, late]
    const pids = procs.map((a) => a.child.pid!)
    const bootPid = net.boot.child.pid!
    const cpu0 = pids.map(cpuSeconds)
    const boot0 = cpuSeconds(bootPid)
    const w0 = Date.now()
    await sleep((opts.idleS ?? 30) * 1000)
    const wall = (Date.now() - w0) / 1000
    const cpuPct = pids.map((p, i) => Math.round(((cpuSeconds(p) - cpu0[i]!) / wall) * 1000) / 10)
    const bootCpu = Math.round(((cpuSeconds(bootPid) - boot0) / wall) * 1000) / 10
    const rss = pids.map((p) => Math.round(rssMB(p) * 10) / 10)
    const pss = pids.map((p) => Math.round(pssMB(p) * 10) / 10)
    const linksOpen: number[] = []
    for (const c of clients) linksOpen.push(((await call(c, 'status')) as NetStatus).net.linksOpen)
    const linksOpenIdle = [...linksOpen]
    const settleFrom = Date.now()
    if (opts.linksSettle !== undefined) {
      const { bound, withinMs } = opts.linksSettle
      while (Math.max(...linksOpen) > bound && Date.now() - settleFrom < withinMs) {
        await sleep(1000)
        for (const [i, c] of clients.entries())
          linksOpen[i] = ((await call(c, 'status')) as NetStatus).net.linksOpen
      }
    }
    const linksSettledMs = Date.now() - settleFrom
    const load1 = loadavg()[0]!
    log(
      `idle: rss median ${median(rss)} max ${Math.max(...rss)} MB, pss median ${median(pss)} max ${Math.max(...pss)} MB, cpu median ${median(cpuPct)}% max ${Math.max(...cpuPct)}%, boot ${rssMB(bootPid).toFixed(1)} MB ${bootCpu}%, links open median ${median(linksOpen)} max ${Math.max(...linksOpen)}, load ${load1}`,
    )
    await opts.whileUp?.(net, procs)
    return {
      agents: agents.length,
      clouds: nClouds,
      joinMs,
      reachMs,
      joinAllMs,
      pings: {
        ok: pingMs.length,
        failedAttempts,
        msMedian: median(pingMs),
        msMax: Math.max(...pingMs),
      },
      rssMB: rss,
      pssMB: pss,
      cpuPct,
      boot: { rssMB: Math.round(rssMB(bootPid) * 10) / 10, cpuPct: bootCpu },
      linksOpen,
      linksOpenIdle,
      linksSettledMs,
      linksBuilt,
      linkFailures,
      gossip: { join: gJoin, oneMore },
      load1: { start: load0, idle: load1 },
    }
  } catch (err) {
    const dead = deadAgents([net.boot, ...started])
    if (dead !== '' && err instanceof Error) err.message += `\n${dead}`
    throw err
  } finally {
    for (const c of clients) c.close()
    await net.destroy()
  }
}
