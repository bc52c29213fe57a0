/**
 * Shared by the end-to-end migration fault suites (migrate-faults-e2e, migrate-kills-e2e): where a VM
 * runs, the migrate CLI as a child, and a client that reads the guest's memory checker all along.
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { type AgentProc, MESH_BIN, REPO_ROOT } from '../../fixtures/testnet/testnet.ts'
import { ramDirFor } from '../../src/agent/run.ts'

export const LINE_CLIENT = join(REPO_ROOT, 'test/helpers/line-client.ts')

export interface VmRow {
  name: string
  status: string
}

/** One memcheck command through the client's namespace (e.g. `check` → `OK …`). */
export async function guestCommand(client: AgentProc, ip: string, cmd: string): Promise<string> {
  const r = await client.host.exec(
    process.execPath,
    ['--import', 'tsx', LINE_CLIENT, ip, String(MEMCHECK_PORT), cmd, '60000'],
    { timeoutMs: 90_000 },
  )
  assert.equal(r.code, 0, `memcheck '${cmd}': ${r.stderr}`)
  return r.stdout.trim()
}

export async function vmRows(a: AgentProc, vm: string): Promise<VmRow[]> {
  const r = await a.json<{ vms: VmRow[] }>(['vm', 'ls'], { timeoutMs: 30_000 })
  return r.vms.filter((v) => v.name === vm)
}

/**
 * Polls the hosts until exactly one runs the VM and the others hold no copy at all (not even a paused
 * one); fails at once if two ever run it. Returns the host that runs it.
 */
export async function oneCopy(agents: AgentProc[], vm: string, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const rows = await Promise.all(agents.map((a) => vmRows(a, vm)))
    const running = agents.filter((_, i) => rows[i]!.some((v) => v.status === 'running'))
    assert.ok(running.length <= 1, `two running copies: ${JSON.stringify(rows)}`)
    const holding = agents.filter((_, i) => rows[i]!.length > 0)
    if (running.length === 1 && holding.length === 1) return running[0]!.name
    if (Date.now() > deadline)
      assert.fail(
        `not exactly one copy after ${timeoutMs} ms: ${agents.map((a, i) => `${a.name}: ${JSON.stringify(rows[i])}`).join(', ')}`,
      )
    await sleep(500)
  }
}

/** `mesh migrate VM --to TO --json` against `from`'s agent, as a child whose output the test reads. */
export function startMigrate(from: AgentProc, vm: string, to: string, spawned: ChildProcess[]): ChildProcess {
  const child = from.host.spawn(process.execPath, [
    MESH_BIN,
    'migrate',
    vm,
    '--to',
    to,
    '--json',
    '--state',
    from.state,
  ])
  spawned.push(child)
  return child
}

/** The QEMU processes of an agent (their command lines name its RAM dir). */
export async function qemus(a: AgentProc): Promise<number[]> {
  const r = await a.host.exec('pgrep', ['-f', `qemu-system.*${ramDirFor(a.state)}`])
  return r.stdout
    .split('\n')
    .filter((l) => /^\d+$/.test(l.trim()))
    .map(Number)
}

/**
 * Polls the memory checker's `stats` every 100 ms on one connection (reconnecting whenever it drops)
 * and prints `<receivedAtMs> <gen> <uptimeMs>` per answer, `down <why>` when the connection fails.
 * Plain Node, no loader: it starts fast inside the client's namespace.
 */
export const GEN_READER = `
const net = require('node:net')
const [host, port] = process.argv.slice(1)
let stopped = false
function open() {
  const s = net.connect({ host, port: Number(port) })
  let buf = ''
  let timer
  s.setNoDelay(true)
  s.on('connect', () => {
    console.log('connected')
    timer = setInterval(() => s.write('stats\\n'), 100)
  })
  s.on('data', (d) => {
    buf += d.toString()
    let i
    while ((i = buf.indexOf('\\n')) >= 0) {
      const line = buf.slice(0, i).trim()
      buf = buf.slice(i + 1)
      const g = / gen=(\\d+)/.exec(line)
      const u = / uptime_ms=(\\d+)/.exec(line)
      if (g && u) console.log(Date.now() + ' ' + g[1] + ' ' + u[1])
    }
  })
  const again = (why) => {
    clearInterval(timer)
    if (stopped) return
    console.log('down ' + why)
    s.destroy()
    setTimeout(open, 200)
  }
  s.on('error', (e) => again(e.message))
  s.on('close', () => again('closed'))
  s.setTimeout(20000, () => again('silent 20 s'))
}
open()
process.on('SIGTERM', () => { stopped = true; console.log('stopped'); process.exit(0) })
`

export interface GenSample {
  at: number
  gen: number
  uptimeMs: number
}

export function genSamples(lines: string[]): GenSample[] {
  return lines
    .filter((l) => /^\d+ \d+ \d+$/.test(l))
    .map((l) => {
      const [at, gen, up] = l.split(' ').map(Number) as [number, number, number]
      return { at, gen, uptimeMs: up }
    })
}

/**
 * The newest state survives: neither the memory checker's generation nor the guest's clock ever goes
 * back in what a client read (an older copy resumed would show both going back). Returns the longest
 * time between two answers in [from, to] (ms since the epoch), the stall a client saw.
 */
export function assertNeverBack(
  samples: GenSample[],
  what: string,
  from = 0,
  to = Number.POSITIVE_INFINITY,
): number {
  let maxGap = 0
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1]!
    const b = samples[i]!
    assert.ok(b.gen >= a.gen, `${what}: memcheck generation went back ${a.gen} → ${b.gen} at ${b.at}`)
    assert.ok(
      b.uptimeMs >= a.uptimeMs,
      `${what}: guest uptime went back ${a.uptimeMs} → ${b.uptimeMs} ms at ${b.at}`,
    )
    if (b.at >= from && a.at <= to) maxGap = Math.max(maxGap, b.at - a.at)
  }
  return maxGap
}
