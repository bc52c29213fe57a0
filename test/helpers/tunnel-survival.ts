/**
 * The survival scenario across NAT'd clouds, shared by test/system/tunnel-survival-e2e.test.ts and
 * `npm run bench -- tunnel`: real `mesh` agents as processes in clouds a, b, c (the VM's hosts) and d
 * (the client: a host TAP port into the guest network), a QEMU guest booted on a1, and a client in d1's
 * namespace that streams through one TCP connection to the guest's echo service while the VM moves
 * a1→b1→c1→a1 through `mesh migrate`.
 */

import { join } from 'node:path'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { ECHO_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines, waitForExit, waitForLine } from '../../fixtures/testnet/clouds.ts'
import type { StreamEchoResult } from '../../fixtures/testnet/stream-client.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  REPO_ROOT,
  runGuestVm,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'

const STREAM_CLIENT = join(REPO_ROOT, 'fixtures/testnet/stream-client.ts')

export const SURVIVAL_SUBNET = '10.98.0'
export const SURVIVAL_GUEST_IP = `${SURVIVAL_SUBNET}.10`
/** The client's address (TAP on d1); b1 gets .2 when `tapOnB` (the benchmark's iperf3 server). */
export const SURVIVAL_CLIENT_IP = `${SURVIVAL_SUBNET}.1`
export const SURVIVAL_B_IP = `${SURVIVAL_SUBNET}.2`

export interface SurvivalNetOptions {
  /** Guest RAM (default 256 MiB, the size the README's figures use). */
  memoryMiB?: number
  /** Also give b1 a host TAP port (SURVIVAL_B_IP), for iperf3 between two members' TAPs. */
  tapOnB?: boolean
  /** Environment for the agents (e.g. MESH_TUNNEL_HOLD=0 to measure without holding). */
  env?: NodeJS.ProcessEnv
  log?: (line: string) => void
}

export interface SurvivalNet {
  net: Testnet
  /** The client member (d1), whose namespace has the TAP port. */
  client: AgentProc
  vm: string
  destroy(): Promise<void>
}

export interface SurvivalMove {
  from: string
  to: string
  totalMs: number
  downtimeMs: number
  wireBytes: number
  /** The longest stream gap that ended between this move's start and the next one's (the stall it caused). */
  gapMs: number
  /** The migration report's phase timings (ms), e.g. saveState, finalSend, ready, resumed. */
  timings?: Record<string, number>
  deviceStateWireBytes?: number
}

export interface SurvivalResult {
  moves: SurvivalMove[]
  stream: StreamEchoResult
  /**
   * Each member's switch drop counters by reason after the moves (`mesh status`), plus `heldTotal`
   * (frames it held for a paused guest), for diagnosis.
   */
  drops: Record<string, Record<string, number>>
  /** Whether d1 could still ping the guest after the stream ended (diagnosis of a stalled stream). */
  pingAfter: boolean
}

/** Builds the four clouds, joins the members, boots the guest on a1 and waits until d1 reaches it. */
export async function createSurvivalNet(o: SurvivalNetOptions = {}): Promise<SurvivalNet> {
  const log = o.log ?? (() => {})
  const image = await ensureGuest()
  const net = await createTestnet({
    clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }, { name: 'd' }],
    noJoin: true,
    ...(o.env === undefined ? {} : { env: o.env }),
  })
  try {
    log('joining a1, b1, c1 (VM hosts) and d1 (client, TAP)')
    await net.join('a1')
    await net.join(
      'b1',
      o.tapOnB === true ? { args: ['--tap', 'mesh0', '--address', `${SURVIVAL_B_IP}/24`] } : {},
    )
    await net.join('c1')
    const client = await net.join('d1', { args: ['--tap', 'mesh0', '--address', `${SURVIVAL_CLIENT_IP}/24`] })
    await net.waitForFullMesh(['a1', 'b1', 'c1', 'd1'], 180_000)
    log('booting the guest on a1')
    const vm = 'surv'
    await runGuestVm(net.agents.get('a1')!, image, {
      name: vm,
      ip: `${SURVIVAL_GUEST_IP}/24`,
      memoryMiB: o.memoryMiB ?? 256,
    })
    // The first frames through a fresh link can take a moment (ARP, MAC learning): ping until it answers.
    const deadline = Date.now() + 60_000
    for (;;) {
      const r = await client.host.exec('busybox', ['ping', '-c', '1', '-W', '2', SURVIVAL_GUEST_IP], {
        timeoutMs: 10_000,
      })
      if (r.code === 0) break
      if (Date.now() > deadline) throw new Error(`guest unreachable from d1 through the tunnel: ${r.stdout}`)
    }
    return { net, client, vm, destroy: () => net.destroy() }
  } catch (err) {
    await net.destroy()
    throw err
  }
}

/**
 * Streams to the guest's echo service from d1 while the VM moves along `path` (default a1→b1→c1→a1),
 * `settleMs` apart; returns each move's report and the stream client's result.
 */
export async function surviveMoves(
  s: SurvivalNet,
  opts: { path?: string[]; settleMs?: number; log?: (line: string) => void } = {},
): Promise<SurvivalResult> {
  const log = opts.log ?? (() => {})
  const path = opts.path ?? ['a1', 'b1', 'c1', 'a1']
  const settle = opts.settleMs ?? 1500
  const stream = s.client.host.spawn(process.execPath, [
    '--import',
    'tsx',
    STREAM_CLIENT,
    SURVIVAL_GUEST_IP,
    String(ECHO_PORT),
    '900000',
    // The echo may lag by seconds after a move on a loaded box: it gets 30 s to catch up.
    '30000',
  ])
  try {
    await waitForLine(stream, /^connected/, 60_000)
    await new Promise((r) => setTimeout(r, 2000))
    const moves: SurvivalMove[] = []
    const starts: number[] = []
    for (let i = 1; i < path.length; i++) {
      const from = path[i - 1]!
      const to = path[i]!
      log(`migrating ${from} → ${to}`)
      starts.push(Date.now())
      const r = await s.net.agents
        .get(from)!
        .mesh(['migrate', s.vm, '--to', to, '--json'], { timeoutMs: 300_000 })
      if (r.code !== 0) throw new Error(`mesh migrate ${from} → ${to} failed: ${r.stderr.slice(-2000)}`)
      const rep = lastJson<{
        event: string
        totalMs: number
        downtimeMs: number
        wireBytes: number
        timings?: Record<string, number>
        deviceStateWireBytes?: number
      }>(r.stdout)
      if (rep.event !== 'done') throw new Error(`mesh migrate ${from} → ${to}: ${JSON.stringify(rep)}`)
      moves.push({
        from,
        to,
        totalMs: Math.round(rep.totalMs),
        downtimeMs: Math.round(rep.downtimeMs),
        wireBytes: rep.wireBytes,
        gapMs: 0,
        ...(rep.timings === undefined ? {} : { timings: rep.timings }),
        ...(rep.deviceStateWireBytes === undefined ? {} : { deviceStateWireBytes: rep.deviceStateWireBytes }),
      })
      log(`  ${Math.round(rep.totalMs)} ms, downtime ${Math.round(rep.downtimeMs)} ms`)
      await new Promise((r) => setTimeout(r, settle))
    }
    starts.push(Date.now())
    stream.kill('SIGTERM')
    await waitForExit(stream, 30_000)
    const line = outputLines(stream)
      .filter((l) => l.startsWith('{'))
      .at(-1)
    if (line === undefined)
      throw new Error(`stream client printed no result:\n${outputLines(stream).join('\n')}`)
    const result = JSON.parse(line) as StreamEchoResult
    for (const g of result.gaps) {
      const i = starts.findIndex((t, k) => k < moves.length && g.endAt >= t && g.endAt < starts[k + 1]!)
      if (i >= 0) moves[i]!.gapMs = Math.max(moves[i]!.gapMs, g.ms)
    }
    const drops: Record<string, Record<string, number>> = {}
    for (const n of ['a1', 'b1', 'c1', 'd1']) {
      const st = await s.net.agents
        .get(n)!
        .json<{ tunnel?: { drops?: Record<string, number>; heldTotal?: number } }>(['status'], {
          timeoutMs: 30_000,
        })
        .catch(() => undefined)
      drops[n] = { ...st?.tunnel?.drops, heldTotal: st?.tunnel?.heldTotal ?? -1 }
    }
    const ping = await s.client.host.exec('busybox', ['ping', '-c', '3', '-W', '3', SURVIVAL_GUEST_IP], {
      timeoutMs: 30_000,
    })
    return { moves, stream: result, drops, pingAfter: ping.code === 0 }
  } finally {
    if (stream.exitCode === null && stream.signalCode === null) stream.kill('SIGKILL')
  }
}
