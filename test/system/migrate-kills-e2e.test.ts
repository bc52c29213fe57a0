/**
 * Fault injection: agents killed during moves, end to end. Agents are processes in different NAT'd
 * clouds, started with a test preload (test/helpers/fault-hook.mjs) that can SIGKILL an agent at a
 * named point of a move (every state transition, and `destination:recorded` between the commit record
 * and the resume). A real QEMU guest churns memory; a client in a third cloud reads its memory
 * checker's generation and uptime all along. After every kill the killed agent restarts, and:
 *  1. the VM runs on exactly one member;
 *  2. the newest state survives: the client never sees the generation or the guest's clock go back,
 *     and the memory checker's `check` passes;
 *  3. a following clean move succeeds.
 * Targeted kills: the destination at its resume (before and after `vm.resume`), in the pause before the
 * commit (the source must roll back within ~2 s, not wait for the link's dead timer), and the source at
 * each phase. Then a randomized run: MESH_KILLS kills (default 3; `npm run test:kills`, which CI runs: 24) at
 * random points or random times, seed printed (MESH_KILL_SEED=<seed> replays a run).
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  REPO_ROOT,
  runGuestVm,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import {
  assertNeverBack,
  GEN_READER,
  genSamples,
  guestCommand,
  type KillWhen,
  killDuringMove,
  oneCopy,
  randomKills,
  samplesAfter,
  type Victim,
} from '../helpers/migration-e2e.ts'

const GUEST_IP = '10.99.0.10'
const VM = 'g1'
const HOOK = join(REPO_ROOT, 'test/helpers/fault-hook.mjs')

type When = KillWhen

interface KillResult {
  victim: Victim
  when: string
  fired: boolean
  migrateExit: number | null
  migrateSaid: string
  runsOn: string
  settledMs: number
  stallMs: number
  cleanMoveMs: number
}

const POINTS: Record<Victim, string[]> = {
  source: ['bulk', 'precopy', 'switching', 'paused', 'committed', 'handover', 'completed'],
  destination: ['receiving', 'final', 'loaded', 'committed', 'recorded', 'resumed', 'running'],
}

describe("fault injection: agents killed during moves across NAT'd clouds (e2e, CLI, QEMU guest)", function () {
  this.timeout(1_800_000)
  let net: Testnet | undefined
  let client: AgentProc
  let reader: ChildProcess
  const spawned: ChildProcess[] = []
  const results: KillResult[] = []

  const agent = (name: string) => net!.agents.get(name)!
  const pair = () => [agent('a1'), agent('b1')]

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft', 'qemu-system-x86_64', 'pgrep'] })
    const t0 = performance.now()
    const image = await ensureGuest()
    net = await createTestnet({
      clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }],
      noJoin: true,
      // e.g. MESH_KILLS_AGENT_ARGS='--no-direct --no-relay-bulk': everything over the WebRTC link.
      ...(process.env.MESH_KILLS_AGENT_ARGS
        ? { agentArgs: process.env.MESH_KILLS_AGENT_ARGS.split(' ') }
        : {}),
      env: { NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --import=${HOOK}`.trim() },
    })
    const a1 = await net.join('a1')
    const [, , c1] = await Promise.all([
      runGuestVm(a1, image, { name: VM, ip: `${GUEST_IP}/24`, memoryMiB: 128 }),
      net.join('b1'),
      net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] }),
    ])
    client = c1
    await net.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    assert.match(await guestCommand(client, GUEST_IP, 'fill 16'), /^OK/)
    // The guest keeps writing: an older copy resumed would show an older generation.
    assert.match(await guestCommand(client, GUEST_IP, 'churn 1'), /^OK/)
    reader = client.host.spawn(process.execPath, ['-e', GEN_READER, GUEST_IP, String(MEMCHECK_PORT)])
    process.stdout.write(`      testnet and guest ready in ${Math.round(performance.now() - t0)} ms\n`)
  })

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined)
      process.stdout.write(`${await net.diagnose()}\n`)
    for (const c of spawned.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL')
  })

  after(async () => {
    reader?.kill('SIGTERM')
    if (results.length > 0)
      process.stdout.write(
        `      kills:\n${results.map((r) => `        ${r.victim}@${r.when}${r.fired ? '' : ' (not reached)'}: migrate exit ${r.migrateExit} (${r.migrateSaid.slice(0, 160)}); runs on ${r.runsOn} ${r.settledMs} ms after the kill; client stall ${r.stallMs} ms; clean move ${r.cleanMoveMs} ms`).join('\n')}\n`,
      )
    await net?.destroy()
  })

  /** Where the VM runs now (exactly one copy), and the other member. */
  async function ends(): Promise<[AgentProc, AgentProc]> {
    const on = await oneCopy(pair(), VM, 180_000)
    return on === 'a1' ? [agent('a1'), agent('b1')] : [agent('b1'), agent('a1')]
  }

  /**
   * One move with one kill, then the three assertions. The killed agent restarts `restartAfterMs`
   * after it died.
   */
  async function killedMove(victim: Victim, when: When, restartAfterMs = 0): Promise<KillResult> {
    const [src, dst] = await ends()
    await net!.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    const {
      fired: wasFired,
      killedAt,
      mig,
      said,
    } = await killDuringMove({
      src,
      dst,
      victim,
      when,
      vm: VM,
      spawned,
      restartAfterMs,
    })
    // 1. exactly one copy runs.
    const runsOn = await oneCopy(pair(), VM, 180_000)
    const settledMs = Date.now() - killedAt
    // 2. the newest state survives.
    assert.match(await guestCommand(client, GUEST_IP, 'check'), /^OK/)
    const samples = await samplesAfter(reader, 3)
    const stallMs = assertNeverBack(
      samples,
      `${victim}@${JSON.stringify(when)}`,
      killedAt - 30_000,
      Date.now(),
    )
    // 3. the next move works.
    await net!.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    const other = runsOn === 'a1' ? 'b1' : 'a1'
    const t0 = Date.now()
    const clean = await agent(runsOn).mesh(['migrate', VM, '--to', other, '--json'], { timeoutMs: 240_000 })
    assert.equal(clean.code, 0, `the clean move after the kill failed: ${clean.stderr}`)
    assert.equal(await oneCopy(pair(), VM, 60_000), other)
    const r: KillResult = {
      victim,
      when: 'point' in when ? when.point : `${when.afterMs}ms`,
      fired: wasFired,
      migrateExit: mig.exitCode,
      migrateSaid: said,
      runsOn,
      settledMs,
      stallMs,
      cleanMoveMs: Date.now() - t0,
    }
    results.push(r)
    return r
  }

  it('destination killed in the pause before the commit → the source rolls back within ~2 s (its probe), not the link dead timer', async () => {
    const r = await killedMove('destination', { point: 'final' })
    assert.ok(r.fired, 'the destination reached the point')
    assert.notEqual(r.migrateExit, 0)
    assert.match(r.migrateSaid, /stopped answering|closed/)
    // The migrate command's own events: from the switch to the rollback.
    const pause = /"phase":"switch".*"elapsedMs":([\d.]+)/
    const lines = outputLines(spawned.at(-1)!)
    const sw = lines.map((l) => pause.exec(l)).find((m) => m !== null)
    const rb = lines.map((l) => /"phase":"rollback".*"elapsedMs":([\d.]+)/.exec(l)).find((m) => m !== null)
    assert.ok(sw && rb, 'switch and rollback events')
    const pausedMs = Number(rb![1]) - Number(sw![1])
    process.stdout.write(
      `      source paused ${Math.round(pausedMs)} ms before rolling back (client stall ${r.stallMs} ms)\n`,
    )
    assert.ok(pausedMs < 4000, `paused ${pausedMs} ms`)
  })

  it('destination killed after its commit record, before the resume → the restarted destination re-adopts and resumes it', async () => {
    const r = await killedMove('destination', { point: 'recorded' })
    assert.ok(r.fired)
    assert.equal(r.runsOn === 'a1' || r.runsOn === 'b1', true)
  })

  it('destination killed the moment it resumed the guest → re-adopted, never swept, never undone', async () => {
    const r = await killedMove('destination', { point: 'resumed' })
    assert.ok(r.fired)
  })

  for (const point of ['precopy', 'paused', 'committed', 'handover'])
    it(`source killed at '${point}' → one copy, newest state, next move works`, async () => {
      const r = await killedMove('source', { point })
      assert.ok(r.fired)
      assert.match(r.migrateSaid, /done|agent stopped|last seen/)
    })

  it('randomized kills (seed printed; MESH_KILLS, MESH_KILL_SEED)', async () => {
    await randomKills({
      label: 'random kills',
      killsVar: 'MESH_KILLS',
      defaultKills: 3,
      points: POINTS,
      killedMove: (victim, when, restartAfterMs) => killedMove(victim, when, restartAfterMs),
    })
    const samples = genSamples(outputLines(reader))
    assert.ok(samples.length > 50, `the client read the guest all along (${samples.length} answers)`)
    // The token history on every member, from a third one: the member that runs the VM holds the newest.
    const t = await client.json<{
      members: Array<{ member: string; token?: number; status?: string; error?: string }>
    }>(['vm', 'tokens', VM])
    const on = await oneCopy(pair(), VM, 60_000)
    const row = t.members.find((m) => m.member === on)
    for (const n of ['a1', 'b1', 'c1'])
      assert.ok(
        t.members.some((m) => m.member === n && m.error === undefined),
        `${n} answered: ${JSON.stringify(t.members)}`,
      )
    assert.equal(row?.status, 'running')
    assert.equal(row?.token, Math.max(...t.members.map((m) => m.token ?? 0)))
    process.stdout.write(`      tokens: ${t.members.map((m) => `${m.member}=${m.token}`).join(' ')}\n`)
  })
})
