/**
 * Shared by the end-to-end migration fault suites (migrate-faults-e2e, migrate-kills-e2e,
 * disk-kills-e2e): where a VM runs, the migrate CLI as a child, a client that reads the guest's memory
 * checker all along, and one move with an agent killed -9 in it (killDuringMove).
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines, waitForExit } from '../../fixtures/testnet/clouds.ts'
import { type AgentProc, MESH_BIN, REPO_ROOT } from '../../fixtures/testnet/testnet.ts'
import { ramDirFor } from '../../src/agent/run.ts'
import { prng } from './prng.ts'
import { waitUntil } from './wait.ts'

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
 * The reader's samples once it has `more` answers beyond what it has now: read after a check, they cover
 * the copy that survived (waiting on answers, not on a fixed time).
 */
export async function samplesAfter(reader: ChildProcess, more: number): Promise<GenSample[]> {
  const answered = genSamples(outputLines(reader)).length
  await waitUntil(
    `${more} more answers from the guest`,
    () => genSamples(outputLines(reader)).length >= answered + more,
    { timeoutMs: 30_000, intervalMs: 50 },
  )
  return genSamples(outputLines(reader))
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

export type Victim = 'source' | 'destination'
/** A named point (test/helpers/fault-hook.mjs kills the agent there) or a time after the move started. */
export type KillWhen = { point: string } | { afterMs: number }

export interface KilledMove {
  /** The hook reached the point (always true for a timed kill). */
  fired: boolean
  killedAt: number
  /** The `mesh migrate` child (its output: outputLines). */
  mig: ChildProcess
  /** What the CLI said: 'done', or its `mesh:` error line. */
  said: string
}

/**
 * One move src → dst with `victim`'s agent killed -9 at `when`, restarted `restartAfterMs` after it died
 * (without waiting for the migrate command: a source in doubt waits for this very agent). Asserts the
 * CLI ends with a clear outcome: a report, or an error that says where the VM is. The agents' NODE_OPTIONS
 * must import the fault hook.
 */
export async function killDuringMove(o: {
  src: AgentProc
  dst: AgentProc
  victim: Victim
  when: KillWhen
  vm: string
  spawned: ChildProcess[]
  restartAfterMs?: number
}): Promise<KilledMove> {
  const { when, vm } = o
  const target = o.victim === 'source' ? o.src : o.dst
  const fired = join(target.state, 'test-fault.fired')
  const armed = join(target.state, 'test-fault.json')
  if (existsSync(fired)) writeFileSync(fired, '')
  if ('point' in when) writeFileSync(armed, JSON.stringify({ at: `${o.victim}:${when.point}`, vm }))
  const mig = startMigrate(o.src, vm, o.dst.name, o.spawned)
  const died = new Promise<void>((r) => target.child.once('exit', () => r()))
  if ('point' in when) {
    // The hook kills the agent at the point; a move that ends without reaching it leaves it alive:
    // disarm, kill anyway (the caller then sees fired = false).
    await Promise.race([died, waitForExit(mig, 300_000)])
    if (target.child.exitCode === null && target.child.signalCode === null) {
      writeFileSync(armed, '{}')
      await target.kill()
    }
  } else {
    await sleep(when.afterMs)
    await target.kill()
  }
  const killedAt = Date.now()
  await died
  const wasFired = 'point' in when ? existsSync(fired) && readFileSync(fired, 'utf8').trim() !== '' : true
  await sleep(o.restartAfterMs ?? 0)
  await target.restart()
  assert.ok(await waitForExit(mig, 240_000), 'mesh migrate did not end')
  const out = outputLines(mig)
  const said =
    out.find((l) => l.startsWith('mesh:')) ??
    (out.some((l) => l.startsWith('{"event":"done"')) ? 'done' : out.slice(-1).join(''))
  // A source killed before its agent said anything of the move (a timed kill in the first ~100-300 ms:
  // before the CLI reached the agent's socket, or before the agent's first progress event) has no move
  // to report on: the CLI can only say that its agent is gone. That is the clear outcome there (seen as
  // 'unclear outcome' with a random kill at 0 ms: seed 38979); where the VM is, the caller checks (one
  // copy, newest state). Once the move said anything, the CLI must say where the VM is, as below.
  const began = out.some((l) => l.startsWith('{"event":"progress"'))
  if (mig.exitCode === 0) assert.equal(said, 'done', `exit 0 without a report: ${out.slice(-3).join(' | ')}`)
  else if (!began && o.victim === 'source')
    assert.match(
      said,
      /no agent is running for this state dir|the agent closed the control connection/,
      `unclear outcome (killed before the move began): ${out.slice(-4).join(' | ')}`,
    )
  else
    assert.match(
      said,
      new RegExp(
        `rolled back: VM '${vm}' is running on|not moved: VM '${vm}' is running on|last seen|stays paused here|stopped answering|agent stopped`,
      ),
      `unclear outcome: ${out.slice(-4).join(' | ')}`,
    )
  return { fired: wasFired, killedAt, mig, said }
}

/**
 * Kills during moves, one after the other, drawn from a seed: the victim (source or destination), a kill
 * point or a time into the move, and a restart delay. The seed is printed (MESH_KILL_SEED replays it);
 * a failing kill names its number, the seed and what it did. `killsVar` names the env var that sets
 * the number of kills (default `defaultKills`). Resolves with the seed, for later messages.
 */
export async function randomKills(o: {
  label: string
  killsVar: string
  defaultKills: number
  points: Record<Victim, readonly string[]>
  killedMove: (victim: Victim, when: KillWhen, restartAfterMs: number) => Promise<unknown>
}): Promise<{ seed: number }> {
  const kills = Number(process.env[o.killsVar] ?? o.defaultKills)
  const seed = Number(process.env.MESH_KILL_SEED ?? Math.floor(Math.random() * 2 ** 31))
  process.stdout.write(
    `      ${o.label}: ${kills}, seed ${seed} (replay: MESH_KILL_SEED=${seed} ${o.killsVar}=${kills})\n`,
  )
  const rnd = prng(seed)
  for (let i = 0; i < kills; i++) {
    const victim: Victim = rnd() < 0.5 ? 'source' : 'destination'
    const points = o.points[victim]
    const when: KillWhen =
      rnd() < 0.5
        ? { point: points[Math.floor(rnd() * points.length)]! }
        : { afterMs: Math.floor(rnd() * 8000) }
    const restartAfterMs = Math.floor(rnd() * 3000)
    process.stdout.write(
      `      kill ${i + 1}/${kills}: ${victim} at ${JSON.stringify(when)}, restart after ${restartAfterMs} ms\n`,
    )
    try {
      await o.killedMove(victim, when, restartAfterMs)
    } catch (err) {
      throw new Error(`kill ${i + 1} (seed ${seed}): ${victim} at ${JSON.stringify(when)}: ${String(err)}`, {
        cause: err,
      })
    }
  }
  return { seed }
}
