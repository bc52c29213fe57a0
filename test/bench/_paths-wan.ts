// Interim bench (until `bench wan` lands; then fold into it): punch / relay bulk throughput vs iperf3 baselines over WAN profiles,
// on the clouds fixture with the wan helper's WIP /tmp/wanem (NFQUEUE delay+loss) and tbf for rate.
// Needs the wan helper's NFQUEUE delay/loss program (fixtures/wan/wanem.c, built; path in $WANEM) and root.
// Env: PROFILES=crosscloud,region REPS=3 MIB=64 CC=bbr|default HOSTCC=cubic. Prints one JSON line.

import type { ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { createTestnet, lastJson } from '../../fixtures/testnet/testnet.ts'

const PROFILES: Record<string, { d: number; l: number; r: string }> = {
  lan: { d: 225, l: 0, r: '10gbit' },
  region: { d: 750, l: 0, r: '2gbit' },
  crosscloud: { d: 7500, l: 0.00025, r: '1gbit' },
  intercontinental: { d: 30000, l: 0.001, r: '300mbit' },
}
const want = (process.env.PROFILES ?? 'crosscloud').split(',')
const REPS = Number(process.env.REPS ?? 3)
const MIB = Number(process.env.MIB ?? 64)
const CC = process.env.CC ?? 'bbr'
const HOSTCC = process.env.HOSTCC ?? 'cubic'
const t0 = Date.now()
const net = await createTestnet({
  clouds: [
    { name: 'ca', hosts: ['a'] },
    { name: 'cb', hosts: ['b'] },
    { name: 'sy', nat: 'symmetric', hosts: ['s'] },
  ],
  turn: true,
  noJoin: true,
})
const result: Record<string, unknown> = { CC, HOSTCC, MIB, REPS }
const errs: string[] = []
result.errs = errs
let wanem: ChildProcess | undefined
const median = (xs: number[]) => {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b)
  return s.length ? s[Math.floor(s.length / 2)]! : NaN
}
try {
  const topo = net.topo
  for (const c of topo.clouds) {
    await c.router.run('iptables', [
      '-w',
      '5',
      '-t',
      'raw',
      '-A',
      'PREROUTING',
      '-i',
      'lan0',
      '-j',
      'NFQUEUE',
      '--queue-num',
      '0',
    ])
    await c.router.run('iptables', [
      '-w',
      '5',
      '-t',
      'raw',
      '-A',
      'PREROUTING',
      '-i',
      'wan0',
      '-j',
      'NFQUEUE',
      '--queue-num',
      '1',
    ])
  }
  for (const h of ['a', 'b', 's'])
    await topo.host(h).run('sysctl', ['-qw', `net.ipv4.tcp_congestion_control=${HOSTCC}`])
  const setProfile = async (p: { d: number; l: number; r: string }) => {
    if (wanem) {
      wanem.kill('SIGTERM')
      await new Promise((r) => wanem!.once('exit', r))
    }
    const args = ['--rt']
    for (const c of topo.clouds) {
      await c.router.exec('tc', ['qdisc', 'del', 'dev', 'wan0', 'root'])
      await c.router.run('tc', [
        'qdisc',
        'add',
        'dev',
        'wan0',
        'root',
        'tbf',
        'rate',
        p.r,
        'burst',
        '256kb',
        'limit',
        '16mb',
      ])
      args.push('--netns', `/run/netns/${c.router.ns}`, '-q', `0:${p.d}:0:${p.l}`, '-q', `1:${p.d}:0:${p.l}`)
    }
    wanem = topo.host('boot').spawn(process.env.WANEM ?? '/tmp/wanem', args)
    await new Promise((r) => setTimeout(r, 1000))
  }
  await setProfile(PROFILES.lan!)
  const agentArgs = ['--tcp-congestion', CC]
  const a = await net.join('a', { args: agentArgs })
  const b = await net.join('b', { args: agentArgs })
  const s = await net.join('s', { args: agentArgs })
  await net.waitForFullMesh(['a', 'b', 's'], 200_000)
  const until = async (what: string, cond: () => Promise<boolean>, ms = 120_000) => {
    const end = Date.now() + ms
    while (!(await cond())) {
      if (Date.now() > end) throw new Error(`timed out: ${what}`)
      await new Promise((r) => setTimeout(r, 500))
    }
  }
  const peer = async (x: typeof a, name: string) =>
    (await x.json<{ peers: { name: string; bulk?: string; rttMs?: number }[] }>(['peers'])).peers.find(
      (p) => p.name === name,
    )
  await until('a-b bulk', async () => (await peer(a, 'b'))?.bulk !== undefined)
  await until('a-s bulk', async () => (await peer(a, 's'))?.bulk !== undefined)
  result.abPath = (await peer(a, 'b'))?.bulk
  result.asPath = (await peer(a, 's'))?.bulk
  const bHost = topo.host('b')
  const bpub = (await topo.cloud('cb').forwardTcp(5201, bHost)).split('/')[2]!
  const iperf = async (cc: string) => {
    const srv = bHost.spawn('iperf3', ['-s', '-1'])
    await new Promise((r) => setTimeout(r, 400))
    const r = await topo
      .host('a')
      .exec('iperf3', ['-c', bpub, '-t', '8', '-C', cc, '-J'], { timeoutMs: 40_000 })
    srv.kill()
    try {
      return +(JSON.parse(r.stdout).end.sum_received.bits_per_second / 8e6).toFixed(1)
    } catch {
      errs.push((r.stderr + r.stdout).slice(-300))
      return NaN
    }
  }
  const linkBench = async (x: typeof a, y: string) => {
    const r = await x.mesh(['bench', y, '--mib', String(process.env.LINKMIB ?? 2), '--json'], {
      timeoutMs: 300_000,
    })
    try {
      return +lastJson<{ mbps: number }>(r.stdout).mbps.toFixed(2)
    } catch {
      errs.push((r.stderr + r.stdout).slice(-300))
      return NaN
    }
  }
  const streamBench = async (x: typeof a, y: string) => {
    const r = await x.mesh(['bench', y, '--over', 'libp2p', '--mib', String(MIB), '--json'], {
      timeoutMs: 300_000,
    })
    try {
      return +lastJson<{ mbps: number }>(r.stdout).mbps.toFixed(1)
    } catch {
      errs.push((r.stderr + r.stdout).slice(-300))
      return NaN
    }
  }
  let n = 0
  const pull = async (x: typeof a) => {
    const file = join(net.dir, `p${++n}.bin`)
    writeFileSync(file, randomBytes(MIB * 1024 * 1024))
    const push = await a.mesh(['image', 'push', file, '--name', `p${n}:1`, '--json'], { timeoutMs: 300_000 })
    if (push.code !== 0) return NaN
    const r = await x.mesh(['image', 'pull', `p${n}:1`, '--json'], { timeoutMs: 600_000 })
    try {
      const j = lastJson<{ bytesFetched: number; elapsedMs: number }>(r.stdout)
      return +(j.bytesFetched / 1e3 / j.elapsedMs).toFixed(1)
    } catch {
      errs.push((r.stderr + r.stdout).slice(-300))
      return NaN
    }
  }
  for (const name of want) {
    const p = PROFILES[name]!
    await setProfile(p)
    await new Promise((r) => setTimeout(r, 3000))
    const rows: Record<string, number[]> = {
      tcpCubic: [],
      tcpBbr: [],
      streamPunch: [],
      streamRelay: [],
      pullPunch: [],
      pullRelay: [],
      webrtcSrflx: [],
      webrtcTurn: [],
    }
    for (let i = 0; i < REPS; i++) {
      rows.tcpCubic!.push(await iperf('cubic'))
      rows.tcpBbr!.push(await iperf('bbr'))
      rows.streamPunch!.push(await streamBench(a, 'b'))
      rows.streamRelay!.push(await streamBench(s, 'a'))
      rows.pullPunch!.push(await pull(b))
      rows.pullRelay!.push(await pull(s))
      if (i === 0 || process.env.LINKREPS) {
        rows.webrtcSrflx!.push(await linkBench(a, 'b'))
        rows.webrtcTurn!.push(await linkBench(s, 'a'))
      }
      process.stderr.write(
        `${name} rep ${i}: ${JSON.stringify(Object.fromEntries(Object.entries(rows).map(([k, v]) => [k, v.at(-1)])))}\n`,
      )
    }
    const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
    result[name] = {
      ...Object.fromEntries(Object.entries(rows).map(([k, v]) => [k, { median: median(v), runs: v }])),
      load,
      abPath: (await peer(a, 'b'))?.bulk,
      asPath: (await peer(a, 's'))?.bulk,
      rttMs: (await peer(a, 'b'))?.rttMs,
    }
  }
} catch (err) {
  result.error = String(err)
} finally {
  wanem?.kill('SIGTERM')
  await net.destroy()
}
result.seconds = (Date.now() - t0) / 1000
console.log(JSON.stringify(result))
