/**
 * Busy guests across NAT'd clouds (#15), end to end through the CLI: agents in NAT'd clouds, a real
 * QEMU guest (512 MiB) whose memory checker holds 384 MiB of random data and rewrites it at 64 MiB/s,
 * and a client in a third cloud keeping a TCP echo stream to the guest open.
 *  - `--deadline 5s`: refused within 5 s with the estimate; the guest never paused, still on A, intact;
 *  - `--deadline 60s`: done inside 60 s, paused ≤ 1 s, memory intact, the TCP stream without a reset;
 *  - kill -9 of the source agent, then of the destination agent, during post-copy (forced with
 *    `--mode postcopy`), each restarted: exactly one running copy at the end and the memory checker
 *    intact, or a clearly reported loss (never a silent corruption: memcheck says which).
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { ECHO_PORT, MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines, waitForExit, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  MESH_BIN,
  REPO_ROOT,
  runGuestVm,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import { profileFromEnv, resolveProfile, type WanProfile } from '../../fixtures/wan/profiles.ts'
import { cpuTimes, waitShare } from '../helpers/schedstat.ts'

const GUEST_IP = '10.99.0.10'
const VM = 'g1'
const LINE_CLIENT = join(REPO_ROOT, 'test/helpers/line-client.ts')
const STREAM_CLIENT = join(REPO_ROOT, 'fixtures/testnet/stream-client.ts')
const MiB = 1024 * 1024
/**
 * The clouds' paths are capped at 400 Mbit/s (50 MB/s; kernel tbf, no other emulation unless
 * MESH_TEST_PROFILE adds some). Why: whether `--deadline 5s` is infeasible must not depend on how fast
 * the box is. Uncapped, the path is bounded only by the CPU (11-30 MB/s on this 2-core box with the
 * guest's vCPU on one core; wan4 measured 195 MB/s between idle agents), and a box ~4× this one would
 * move 512 MiB in < 5 s: the refusal test would fail there. At ≤ 50 MB/s any move of this guest needs
 * ≥ 10.7 s (≥ 2× the 5 s deadline) on any box, and the 60 s deadline stays feasible down to ~9 MB/s
 * (so nothing changes on a box as slow as this one). It also keeps the dirty rate (64 MiB/s) above the
 * link on a faster box, so every move here takes the same path (post-copy) wherever CI runs.
 */
// MESH_HOT_CAP_MBIT (checks only): a cap below this box's own link, to see the cap set the agent's rate.
const CAP_MBIT = Number(process.env.MESH_HOT_CAP_MBIT ?? 400)
function cappedProfile(): WanProfile {
  const p = resolveProfile(profileFromEnv())
  const rateMbit = p.rateMbit > 0 ? Math.min(p.rateMbit, CAP_MBIT) : CAP_MBIT
  return { ...p, name: `${p.name}-${rateMbit}mbit`, rateMbit }
}

interface Report {
  event: string
  totalMs: number
  downtimeMs: number
  wireBytes: number
  mode?: string
  switchReason: string
  estimate?: { linkBytesPerSec: number; dirtyBytesPerSec: number; minTotalMs: number; feasible?: boolean }
  postcopy?: { owedBytes: number; ms: number; faults: number; maxFaultWaitMs: number; sessions: number }
  throttle?: { maxLevel: number }
}

describe("busy guests across NAT'd clouds (e2e, CLI, 512 MiB guest rewriting 64 MiB/s)", function () {
  this.timeout(900_000)
  let net: Testnet | undefined
  let client: AgentProc
  const spawned: ChildProcess[] = []
  const agent = (n: string) => net!.agents.get(n)!

  async function guest(cmd: string, timeoutMs = 120_000): Promise<string> {
    const r = await client.host.exec(
      process.execPath,
      ['--import', 'tsx', LINE_CLIENT, GUEST_IP, String(MEMCHECK_PORT), cmd, String(timeoutMs)],
      { timeoutMs: timeoutMs + 30_000 },
    )
    assert.equal(r.code, 0, `memcheck '${cmd}': ${r.stderr}`)
    return r.stdout.trim()
  }

  async function vms(a: AgentProc): Promise<{ name: string; status: string }[]> {
    const r = await a.json<{ vms: { name: string; status: string }[] }>(['vm', 'ls'], { timeoutMs: 60_000 })
    return r.vms.filter((v) => v.name === VM)
  }

  /** Exactly one host runs the VM and the other holds no copy; never two running. Returns where. */
  async function oneCopy(names: [string, string], timeoutMs: number): Promise<string> {
    const deadline = Date.now() + timeoutMs
    let last = ''
    for (;;) {
      const rows = await Promise.all(names.map((n) => vms(agent(n))))
      const runningOn = names.filter((_, i) => rows[i]!.some((v) => v.status === 'running'))
      assert.ok(runningOn.length <= 1, `two running copies: ${JSON.stringify(rows)}`)
      const holding = names.filter((_, i) => rows[i]!.length > 0)
      if (runningOn.length === 1 && holding.length === 1) return runningOn[0]!
      last = names.map((n, i) => `${n}: ${JSON.stringify(rows[i])}`).join(', ')
      if (Date.now() > deadline) assert.fail(`not exactly one copy after ${timeoutMs} ms: ${last}`)
      await sleep(1000)
    }
  }

  function startMigrate(from: AgentProc, to: string, args: string[]): ChildProcess {
    const child = from.host.spawn(process.execPath, [
      MESH_BIN,
      'migrate',
      VM,
      '--to',
      to,
      ...args,
      '--json',
      '--state',
      from.state,
    ])
    spawned.push(child)
    return child
  }

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft', 'qemu-system-x86_64', 'socat', 'gcc'] })
    const image = await ensureGuest()
    net = await createTestnet({
      clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }],
      noJoin: true,
      profile: cappedProfile(),
    })
    await net.join('a1')
    await net.join('b1')
    client = await net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] })
    await net.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    await runGuestVm(agent('a1'), image, { name: VM, ip: `${GUEST_IP}/24`, memoryMiB: 512 })
    assert.match(await guest('fill 384'), /^OK pages=98304 /)
    assert.match(await guest('churn 64'), /^OK churn=64/)
  })

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined)
      process.stdout.write(`${await net.diagnose()}\n`)
  })

  after(async () => {
    for (const c of spawned) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL')
    await net?.destroy()
  })

  let stream: ChildProcess | undefined

  it('--deadline 5s is refused within 5 s with the estimate; the guest never paused and stays on A', async () => {
    stream = client.host.spawn(process.execPath, [
      '--import',
      'tsx',
      STREAM_CLIENT,
      GUEST_IP,
      String(ECHO_PORT),
      '900000',
    ])
    spawned.push(stream)
    await waitForLine(stream, /connected/, 60_000)
    const gen0 = Number(/gen=(\d+)/.exec(await guest('stats'))?.[1])
    const sourcePid = agent('a1').child.pid!
    const cpu0 = cpuTimes(sourcePid)
    const t0 = performance.now()
    const mig = startMigrate(agent('a1'), 'b1', ['--deadline', '5s'])
    await waitForExit(mig, 60_000)
    const ms = performance.now() - t0
    const cpu1 = cpuTimes(sourcePid)
    const starved = waitShare(cpu0, cpu1)
    // What the verdict took less what the box withheld from the source's event loop (where the scan
    // and the estimate run): a slower product still fails, a starved box does not.
    const ownMs = ms - (cpu1.mainWaitMs - cpu0.mainWaitMs)
    const out = outputLines(mig).join('\n')
    process.stdout.write(
      `      refused after ${Math.round(ms)} ms: ${out
        .split('\n')
        .filter((l) => /deadline|needs/.test(l))
        .at(-1)
        ?.slice(0, 300)}\n`,
    )
    // Where the seconds before the verdict went (the source's estimate line has its steps).
    const judged = agent('a1')
      .log()
      .split('\n')
      .filter((l) => l.includes('migration estimate'))
      .at(-1)
    process.stdout.write(
      `      source: ${/afterMs=\S+ steps=\S+/.exec(judged ?? '')?.[0] ?? judged}; waited for a CPU ${Math.round(starved * 100)}% of the time it wanted one\n`,
    )
    assert.notEqual(mig.exitCode, 0, 'the move must be refused')
    // The verdict must come before the deadline it judges (~2.5-3.5 s here). Its steps are CPU work on the
    // source's event loop (the first scan hashes the guest's 512 MiB): in a nice'd e2e run at load ~30
    // the scan alone took 6.8 s and the refusal came after 10.3 s; with the guest's own vCPU busy on a
    // 2-core box the agent waited for a CPU 70-85% of the time it wanted one in every run measured (load
    // 6-30, under the lock too), so a share threshold would excuse every slow verdict. So the
    // bound is on the wall time less the time the box kept the source's event loop waiting for a CPU
    // (schedstat): a verdict that needs more of the agent's own time than 5 s still fails.
    process.stdout.write(
      `      refused after ${Math.round(ms)} ms, ${Math.round(ownMs)} ms of it with the source's event loop not waiting for a CPU\n`,
    )
    assert.ok(ownMs < 5000, `refused after ${Math.round(ms)} ms (${Math.round(ownMs)} ms not starved)`)
    assert.match(out, /E_DEADLINE_INFEASIBLE|cannot move/)
    assert.match(out, /needs ≥ [\d.]+ s at [\d.]+ MB\/s \(\d+ MiB to send\); the guest dirties [\d.]+ MB\/s/)
    // Refused because the agent's own estimate says so: its least time is beyond the deadline.
    const needsS = Number(/needs ≥ ([\d.]+) s/.exec(out)?.[1])
    assert.ok(needsS > 5, `refused although the estimate says ${needsS} s`)
    // No progress event ever reached the switch: the guest was never paused.
    assert.ok(!/"phase":"switch"/.test(out), 'the guest must not have been paused')
    assert.deepEqual(
      (await vms(agent('a1'))).map((v) => v.status),
      ['running'],
    )
    assert.deepEqual(await vms(agent('b1')), [])
    const check = await guest('check')
    assert.match(check, /^OK pages=98304 /, check)
    assert.ok(Number(/gen=(\d+)/.exec(check)?.[1]) > gen0, 'the guest kept writing')
  })

  it('--deadline 60s: done inside 60 s, paused at most 1 s, memory intact, the TCP client never reset', async () => {
    // A refusal is the right answer when the link measured is too slow for 60 s (~18 s needed at the
    // usual 25-30 MB/s here). A nice'd e2e run at load ~30 measured 6.6 MB/s (79 s needed) and the move
    // was refused: so a try refused while the box measurably starved the source's event loop (which
    // sends the RAM and measures the link: runnable but waiting for a CPU >= 30% of the try's wall time,
    // schedstat) is tried again while such tries take less than TRY_BUDGET_MS in all (a starved refusal
    // comes after a few seconds; 3 starved tries in a row were seen once, nice'd at load 17, so a fixed
    // 3 was too few and a time budget bounds the test instead). A refusal on a box that let the agent
    // run fails at once; the refused try left the guest untouched on A.
    const TRY_BUDGET_MS = 300_000
    const sourcePid = agent('a1').child.pid!
    const tries0 = performance.now()
    let mig: ChildProcess
    for (let attempt = 1; ; attempt++) {
      const cpu0 = cpuTimes(sourcePid)
      const t0 = performance.now()
      mig = startMigrate(agent('a1'), 'b1', ['--deadline', '60s'])
      await waitForExit(mig, 240_000)
      const loopWait = (cpuTimes(sourcePid).mainWaitMs - cpu0.mainWaitMs) / (performance.now() - t0)
      const said = outputLines(mig).slice(-5).join('\n')
      process.stdout.write(
        `      try ${attempt}: exit ${mig.exitCode}; the source's event loop waited for a CPU ${Math.round(loopWait * 100)}% of the time\n`,
      )
      const budgetLeft = performance.now() - tries0 < TRY_BUDGET_MS
      if (mig.exitCode !== 0 && said.includes('E_DEADLINE_INFEASIBLE') && loopWait >= 0.3 && budgetLeft) {
        process.stdout.write(`      refused while starved (${/needs ≥ [^;]*/.exec(said)?.[0]}): once more\n`)
        assert.deepEqual(
          (await vms(agent('a1'))).map((v) => v.status),
          ['running'],
        )
        continue
      }
      assert.equal(mig.exitCode, 0, `mesh migrate failed: ${said}`)
      break
    }
    const r = lastJson<Report>(outputLines(mig).join('\n'))
    process.stdout.write(
      `      ${r.mode}: total ${r.totalMs} ms, paused ${r.downtimeMs} ms, ${(r.wireBytes / MiB).toFixed(0)} MiB on the wire; link ${((r.estimate?.linkBytesPerSec ?? 0) / 1e6).toFixed(1)} MB/s, dirty ${((r.estimate?.dirtyBytesPerSec ?? 0) / 1e6).toFixed(1)} MB/s${r.postcopy === undefined ? '' : `; post-copy ${(r.postcopy.owedBytes / MiB).toFixed(0)} MiB in ${r.postcopy.ms} ms, ${r.postcopy.faults} faults (longest ${r.postcopy.maxFaultWaitMs} ms)`}${r.throttle === undefined ? '' : `; throttled to ${r.throttle.maxLevel}`}\n`,
    )
    assert.ok(r.totalMs < 60_000, `took ${r.totalMs} ms`)
    assert.ok(r.downtimeMs <= 1000, `paused ${r.downtimeMs} ms`)
    assert.equal(r.estimate?.feasible, true)
    assert.equal(await oneCopy(['a1', 'b1'], 30_000), 'b1')
    const check = await guest('check')
    assert.match(check, /^OK pages=98304 /, check)
    stream!.kill('SIGTERM')
    await waitForExit(stream!, 60_000)
    const res = JSON.parse(
      outputLines(stream!)
        .filter((l) => l.startsWith('{'))
        .at(-1) ?? '{}',
    ) as { connected: boolean; resets: number; mismatches: number; bytesEchoed: number; maxGapMs: number }
    process.stdout.write(
      `      TCP client: ${res.bytesEchoed} B echoed, longest gap ${res.maxGapMs} ms, ${res.resets} resets\n`,
    )
    assert.equal(res.connected, true)
    assert.equal(res.resets, 0)
    assert.equal(res.mismatches, 0)
    assert.ok(res.bytesEchoed > 0)
  })

  /** A post-copy move from where the guest runs to the other host, whose `role` agent is killed -9 in
   *  post-copy, then restarted. (Where it runs, not where the test before left it: one failed move must
   *  not fail the next tests too.) */
  async function killDuringPostcopy(role: 'source' | 'destination'): Promise<void> {
    const src = await oneCopy(['a1', 'b1'], 60_000)
    const dst = src === 'a1' ? 'b1' : 'a1'
    const victim = role === 'source' ? src : dst
    const mig = startMigrate(agent(src), dst, ['--mode', 'postcopy', '--max-pause', '1s'])
    await waitForLine(mig, /"phase":"postcopy"/, 240_000)
    await sleep(500)
    await agent(victim).kill()
    const killedAt = performance.now()
    await agent(victim).restart()
    const at = await oneCopy([src, dst], 240_000)
    const settledMs = performance.now() - killedAt
    await waitForExit(mig, 240_000).catch(() => {})
    const check = await guest('check', 240_000)
    process.stdout.write(
      `      kill -9 ${victim} (${victim === src ? 'source' : 'destination'}) in post-copy: one copy on ${at} ${Math.round(settledMs)} ms later; memcheck ${check.slice(0, 60)}\n`,
    )
    assert.equal(at, dst, 'the guest ran on the destination: it must stay there')
    assert.match(check, /^OK pages=98304 /, `memory after the kill: ${check}`)
  }

  it('kill -9 of the source agent during post-copy: the restarted source sends the rest; one copy, intact', async () => {
    await killDuringPostcopy('source')
  })

  it('kill -9 of the destination agent during post-copy: the restarted destination takes the pager back', async () => {
    await killDuringPostcopy('destination')
  })
})
