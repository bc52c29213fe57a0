/**
 * `npm run bench -- tunnel [--seconds N] [--no-link] [--no-hold] [--memory MiB]`: the L2 tunnel between
 * real agents across NAT'd clouds, in one run:
 *
 * - linkMBps: the raw link benchmark between two NAT'd clouds (test/bench/link.ts `--clouds`: werift,
 *   the agents' default link engine, between two processes), the baseline the tunnel rides on.
 * - the survival network (test/helpers/tunnel-survival.ts): `mesh` agents as processes in clouds a, b,
 *   c (VM hosts) and d (client with a host TAP port), b1 also with a TAP port, a QEMU guest on a1.
 * - rttMs: ping from d1's TAP to the guest on a1 through the tunnel (average of 10).
 * - iperfMBps: iperf3 TAP(d1) → TAP(b1) through the agents' tunnel (the guest image has no iperf3,
 *   and a TCG guest would measure QEMU's emulation rather than the tunnel).
 * - guestMBps: the guest's chargen service read from d1 (guest → tunnel → host TCP).
 * - survival: d1 streams through one TCP connection to the guest's echo service while the VM
 *   live-migrates a1→b1→c1→a1 with `mesh migrate`: moves, resets, the longest gap (maxGapMs; target
 *   ≤ 300) and each move's downtime. `--no-hold` runs the agents with MESH_TUNNEL_HOLD=0 (frames written
 *   into the paused QEMU, announce after adopt: the behaviour before holding) for comparison.
 */

import { CHARGEN_PORT } from '../../fixtures/guest/ports.ts'
import {
  createSurvivalNet,
  SURVIVAL_B_IP,
  SURVIVAL_GUEST_IP,
  type SurvivalNet,
  surviveMoves,
} from '../helpers/tunnel-survival.ts'

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

async function iperf(s: SurvivalNet, seconds: number): Promise<number | null> {
  const b1 = s.net.agents.get('b1')!.host
  const server = b1.exec('iperf3', ['-s', '-1', '-B', SURVIVAL_B_IP], { timeoutMs: (seconds + 60) * 1000 })
  await new Promise((r) => setTimeout(r, 1000))
  const c = await s.client.host.exec('iperf3', ['-c', SURVIVAL_B_IP, '-t', String(seconds), '-J'], {
    timeoutMs: (seconds + 60) * 1000,
  })
  await server
  try {
    const j = JSON.parse(c.stdout) as { end?: { sum_received?: { bits_per_second?: number } } }
    const bps = j.end?.sum_received?.bits_per_second
    return bps === undefined ? null : round2(bps / 8 / 1e6)
  } catch {
    log(`iperf3 failed: ${c.stderr.slice(-500)} ${c.stdout.slice(-500)}`)
    return null
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
  const s = await createSurvivalNet({
    tapOnB: true,
    memoryMiB,
    log,
    ...(hold ? {} : { env: { MESH_TUNNEL_HOLD: '0' } }),
  })
  try {
    const rttMs = await rtt(s)
    log(`rtt ${rttMs} ms`)
    log(`iperf3 TAP(d1) → TAP(b1), ${seconds} s`)
    const iperfMBps = await iperf(s, seconds)
    log(`iperf ${iperfMBps} MB/s`)
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
      survival,
      guestMBps,
      memoryMiB,
      ...(notes.length > 0 ? { notes } : {}),
    }
  } finally {
    await s.destroy()
  }
}
