/**
 * `npm run bench -- tunnel [--carrier memory|webrtc] [--seconds N] [--no-link]`: the L2 tunnel.
 *
 * One process hosts three switches (a, b, c) joined by links of the chosen carrier (default webrtc:
 * werift over loopback, as between two agents; `memory` isolates the switch's own cost). Host TAP
 * ports on a and b, each in its own namespace; one test guest (QEMU, TCG) on b.
 *
 * - iperfMBps: iperf3 TAP(a) → TAP(b) through the tunnel (the guest image has no iperf3, and a TCG
 *   guest would measure QEMU's emulation instead of the tunnel). Crosses two socat TAP ports.
 * - guestMBps: the guest's chargen service read from TAP(a) (guest → tunnel → host TCP).
 * - linkMBps: the raw link benchmark (test/bench/link.ts: werift between two processes) in the same run.
 * - rttMs: ping from TAP(a) to the guest behind the link (average of 10).
 * - survival (`--survival migrate`, default): a client member streams through one TCP connection to
 *   the guest's echo service (through its TAP port) while the VM live-migrates A→B→C→A with
 *   vm/migration (three hosts + the client in one process, memory links; see
 *   test/helpers/tunnel-migration-rig.ts): moves, resets, longest gap, and the longest event-loop
 *   block in that process (the switches share it with migration). `--survival nic`: only the NIC moves
 *   between the switches (b→c→a→b), no RAM migration: isolates the tunnel's own move handling.
 */

import { monitorEventLoopDelay } from 'node:perf_hooks'
import { CHARGEN_PORT, ECHO_PORT } from '../../fixtures/guest/ports.ts'
import { createLogger } from '../../src/log.ts'
import { createMigRig } from '../helpers/tunnel-migration-rig.ts'
import { createRig, type Rig } from '../helpers/tunnel-rig.ts'

const log = (s: string) => process.stderr.write(`[bench tunnel] ${s}\n`)

function arg(args: string[], name: string): string | undefined {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : undefined
}

async function iperf(rig: Rig, seconds: number): Promise<number | null> {
  const server = rig.exec('iperf3', ['-s', '-1', '-B', rig.taps.get('b')!.ip], (seconds + 30) * 1000, 'b')
  await new Promise((r) => setTimeout(r, 500))
  const c = await rig.exec(
    'iperf3',
    ['-c', rig.taps.get('b')!.ip, '-t', String(seconds), '-J'],
    (seconds + 30) * 1000,
  )
  await server
  try {
    const j = JSON.parse(c.stdout) as { end?: { sum_received?: { bits_per_second?: number } } }
    const bps = j.end?.sum_received?.bits_per_second
    return bps === undefined ? null : Math.round((bps / 8 / 1e6) * 100) / 100
  } catch {
    log(`iperf3 failed: ${c.stderr.slice(-500)}`)
    return null
  }
}

async function chargen(rig: Rig, ip: string, seconds: number): Promise<number | null> {
  const t0 = performance.now()
  const r = await rig.exec(
    'sh',
    ['-c', `timeout ${seconds} nc ${ip} ${CHARGEN_PORT} | wc -c`],
    (seconds + 20) * 1000,
  )
  const bytes = Number(r.stdout.trim())
  const secs = (performance.now() - t0) / 1000
  return Number.isFinite(bytes) && bytes > 0 ? Math.round((bytes / secs / 1e6) * 100) / 100 : null
}

async function migrationSurvival(): Promise<Record<string, unknown>> {
  const rig = await createMigRig(['A', 'B', 'C'], {
    subnet: '10.254.0',
    log: createLogger({ level: 'error' }),
  })
  try {
    const spec = rig.spec('tunbench', '10.254.0.20/24')
    await rig.boot('A', spec)
    await rig.ping('10.254.0.20')
    const lag = monitorEventLoopDelay({ resolution: 10 })
    lag.enable()
    const stream = rig.streamEcho('10.254.0.20', ECHO_PORT)
    await new Promise((r) => setTimeout(r, 2000))
    const downtimes: number[] = []
    for (const [from, to] of [
      ['A', 'B'],
      ['B', 'C'],
      ['C', 'A'],
    ] as const) {
      log(`migrating ${from} → ${to}`)
      const rep = (await rig.hosts.get(from)!.migration.migrate({ vm: spec.name, to })) as unknown as Record<
        string,
        unknown
      >
      downtimes.push(Math.round(Number(rep.downtimeMs)))
      await new Promise((r) => setTimeout(r, 1500))
    }
    const s = await stream.stop()
    lag.disable()
    return {
      moves: downtimes.length,
      resets: s.resets,
      maxGapMs: s.maxGapMs,
      kind: 'live-migration',
      downtimesMs: downtimes,
      eventLoopMaxMs: Math.round(lag.max / 1e6),
      bytes: s.bytesEchoed,
      mismatches: s.mismatches,
      exact: s.bytesEchoed === s.bytesSent && s.mismatches === 0,
    }
  } finally {
    await rig.destroy()
  }
}

export async function main(args: string[]): Promise<Record<string, unknown>> {
  const carrier = (arg(args, '--carrier') ?? 'webrtc') as 'memory' | 'webrtc'
  const seconds = Number(arg(args, '--seconds') ?? 5)
  const notes: string[] = []
  let linkMBps: number | null = null
  if (!args.includes('--no-link')) {
    try {
      const { runLinkBench } = await import('./link.ts')
      log('raw link benchmark (werift, two processes)')
      linkMBps = (await runLinkBench(['--mib', '32'])).mbps
    } catch (err) {
      notes.push(`link benchmark failed: ${err instanceof Error ? err.message : String(err)}`)
    }
  }
  log(`starting 3 switches (${carrier}), TAPs on a and b, guest on b`)
  const rig = await createRig({
    nodes: ['a', 'b', 'c'],
    tapNodes: ['a', 'b'],
    carrier,
    subnet: '10.251.0',
    guests: [{ name: 'g', on: 'b', ip: '10.251.0.20', mac: '52:54:00:fb:00:20' }],
  })
  try {
    const warm = await rig.ping('10.251.0.20', 2)
    if (warm.received === 0) throw new Error(`guest unreachable through the tunnel: ${warm.out}`)
    const ping = await rig.ping('10.251.0.20', 10)
    log(`rtt ${ping.avgMs} ms`)
    log(`iperf3 TAP(a) -> TAP(b), ${seconds} s`)
    const iperfMBps = await iperf(rig, seconds)
    log(`iperf ${iperfMBps} MB/s`)
    const guestMBps = await chargen(rig, '10.251.0.20', seconds)
    log(`guest chargen ${guestMBps} MB/s`)
    log('NIC-only moves: stream to the guest while its NIC moves b→c→a→b')
    const run = rig.startStreamEcho('10.251.0.20', ECHO_PORT, 9000)
    const moves: string[] = []
    for (const to of ['c', 'a', 'b']) {
      await new Promise((r) => setTimeout(r, 2000))
      await rig.moveNic('g', to)
      moves.push(to)
    }
    const s = await run
    const nicMoves = { moves: moves.length, resets: s.resets, maxGapMs: s.maxGapMs, kind: 'nic-move' }
    const switches = Object.fromEntries(
      ['a', 'b', 'c'].map((n) => {
        const st = rig.service(n).switch.status()
        const ports = Object.fromEntries(
          st.ports.map((p) => [p.id, { rx: p.rxFrames, tx: p.txFrames, drops: p.drops }]),
        )
        return [n, { drops: st.drops, ports }] as const
      }),
    )
    await rig.destroy()
    let survival: Record<string, unknown> | null = nicMoves
    if ((arg(args, '--survival') ?? 'migrate') === 'migrate') {
      log('survival: stream to the guest while it live-migrates A→B→C→A')
      try {
        survival = await migrationSurvival()
      } catch (err) {
        notes.push(`migration survival failed: ${err instanceof Error ? err.message : String(err)}`)
        survival = { moves: null, resets: null, maxGapMs: null }
      }
    }
    return {
      iperfMBps,
      linkMBps,
      rttMs: ping.avgMs ?? null,
      survival,
      nicMoves: { ...nicMoves, bytes: s.bytesEchoed, mismatches: s.mismatches, sent: s.bytesSent },
      guestMBps,
      carrier,
      drops: switches,
      ...(notes.length > 0 ? { notes } : {}),
    }
  } finally {
    await rig.destroy()
  }
}
