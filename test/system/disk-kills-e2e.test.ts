/**
 * Fault injection for a VM with a writable disk: agents killed -9 while its disk moves, end to end
 * (agents in NAT'd clouds, through the CLI, the Debian guest on a qcow2 overlay of `debian-pg:1`).
 * The guest's block checker (generations per 4 KiB block in guest RAM, checked against the disk from
 * inside the guest) and memory checker churn all along; a client in a third cloud reads the memory
 * checker's generation. Kills at the disk's own points (mid-way through the disk's first copy, on either
 * side) and at the switch (the guest paused, the final dirty set in flight or in), each followed by the
 * killed agent's restart, then:
 *  1. the VM runs on exactly one member, and no other member keeps a live disk of it (no `.in-` overlay
 *     left: a discarded incoming move's disk is removed, or swept when the killed agent restarts);
 *  2. its disk matches its memory: the block checker says intact, the memory checker's generation and
 *     the guest's clock never went back (no older copy resumed);
 * and each kill's move starts from wherever the VM ended up, so every next move proves the last one left
 * a movable VM (QEMU's NBD server and bitmaps a killed agent left behind included). A last clean move ends it.
 * Then random kills (MESH_DISK_KILLS, default 3 in test:e2e; seed printed, MESH_KILL_SEED=<seed>
 * replays): either agent at a random point of the move (the disk's own ones included) or a random time
 * into it, restarted after a random delay, each checked as above; moves back to the member the VM left
 * start from the disk it kept there (a return move sends only what changed), so kills land in those too.
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { existsSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { DEBIAN_CMDLINE, ensureDebianGuest } from '../../fixtures/guest-debian/build.ts'
import { BLKCHECK_PORT } from '../../fixtures/guest-debian/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { type AgentProc, createTestnet, REPO_ROOT, type Testnet } from '../../fixtures/testnet/testnet.ts'
import {
  assertNeverBack,
  GEN_READER,
  guestCommand,
  type KillWhen,
  killDuringMove,
  LINE_CLIENT,
  oneCopy,
  randomKills,
  samplesAfter,
  type Victim,
} from '../helpers/migration-e2e.ts'

const GUEST_IP = '10.99.0.20'
const VM = 'pg1'
const HOOK = join(REPO_ROOT, 'test/helpers/fault-hook.mjs')

/** Where a random kill may land: every state of a move, and the disk's own points. */
const POINTS: Record<Victim, string[]> = {
  source: ['bulk', 'disk-bulk', 'precopy', 'switching', 'paused', 'committed', 'handover', 'completed'],
  destination: ['receiving', 'disk-data', 'final', 'loaded', 'committed', 'recorded', 'resumed', 'running'],
}

interface KillResult {
  victim: Victim
  point: string
  fired: boolean
  migrateExit: number | null
  migrateSaid: string
  runsOn: string
  settledMs: number
  stallMs: number
}

describe("fault injection: agents killed while a writable disk moves across NAT'd clouds (e2e, CLI, Debian guest)", function () {
  this.timeout(1_200_000)
  let net: Testnet | undefined
  let client: AgentProc
  let reader: ChildProcess
  const spawned: ChildProcess[] = []
  const results: KillResult[] = []

  const agent = (name: string) => net!.agents.get(name)!
  const pair = () => [agent('a1'), agent('b1')]

  async function blk(cmd: string): Promise<string> {
    const r = await client.host.exec(
      process.execPath,
      ['--import', 'tsx', LINE_CLIENT, GUEST_IP, String(BLKCHECK_PORT), cmd, '180000'],
      { timeoutMs: 200_000 },
    )
    assert.equal(r.code, 0, `blkcheck '${cmd}': ${r.stderr}`)
    return r.stdout.trim()
  }

  /** The disks (not previous ones) of the VM in an agent's disk dir. */
  const liveDisks = (a: AgentProc): string[] =>
    existsSync(join(a.state, 'disks'))
      ? readdirSync(join(a.state, 'disks')).filter(
          (n) => n.startsWith(`${VM}.`) && !/\.prev\.(qcow2|since)$/.test(n),
        )
      : []

  before(async function () {
    requireOrSkip(this, {
      root: true,
      commands: ['ip', 'nft', 'qemu-system-x86_64', 'qemu-img', 'debootstrap', 'pgrep'],
    })
    const t0 = performance.now()
    const image = await ensureDebianGuest()
    net = await createTestnet({
      clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }],
      noJoin: true,
      env: { NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --import=${HOOK}`.trim() },
    })
    const [a1, b1, c1] = await Promise.all([
      net.join('a1'),
      net.join('b1'),
      net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] }),
    ])
    client = c1
    await net.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    for (const a of [a1, b1]) {
      const r = await a.mesh(['image', 'push', image.disk, '--name', 'debian-pg:1', '--json'], {
        timeoutMs: 300_000,
      })
      assert.equal(r.code, 0, `image push on ${a.name}: ${r.stderr}`)
    }
    const spec = join(a1.state, `${VM}.vm.json`)
    writeFileSync(
      spec,
      JSON.stringify({
        name: VM,
        memoryMiB: 256,
        kernel: image.kernel,
        initrd: image.initrd,
        ip: `${GUEST_IP}/24`,
        cmdline: DEBIAN_CMDLINE,
        disk: { base: 'debian-pg:1', sizeGiB: 2 },
      }),
    )
    const run = await a1.mesh(['vm', 'run', spec], { timeoutMs: 180_000 })
    assert.equal(run.code, 0, `mesh vm run: ${run.stderr}`)
    for (const deadline = Date.now() + 180_000; ; ) {
      const c = await a1.mesh(['vm', 'console', VM])
      if (/MESH-GUEST-READY/.test(c.stdout)) break
      if (Date.now() > deadline) throw new Error(`${VM} not ready:\n${c.stdout.slice(-2000)}`)
      await sleep(1000)
    }
    // 64 MiB of generation-stamped blocks: the disk's first copy takes two offer batches (512 chunks
    // each), so a kill after the first one lands mid-way; then the guest keeps rewriting blocks and
    // memory for the whole test.
    assert.match(await blk('fill 64'), /^OK blocks=16384 /)
    assert.match(await blk('churn 0.5 8'), /^OK churn=0.5 /)
    assert.match(await guestCommand(client, GUEST_IP, 'fill 8'), /^OK/)
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
        `      kills:\n${results.map((r) => `        ${r.victim}@${r.point}${r.fired ? '' : ' (not reached)'}: migrate exit ${r.migrateExit} (${r.migrateSaid.slice(0, 140)}); runs on ${r.runsOn} ${r.settledMs} ms after the kill; client stall ${r.stallMs} ms`).join('\n')}\n`,
      )
    await net?.destroy()
  })

  /** One move from wherever the VM runs, the victim killed -9 at `when`, restarted, then the checks. */
  async function killedMove(
    victim: Victim,
    when: KillWhen | string,
    restartAfterMs = 0,
  ): Promise<KillResult> {
    const w: KillWhen = typeof when === 'string' ? { point: when } : when
    const point = 'point' in w ? w.point : `${w.afterMs}ms`
    const on = await oneCopy(pair(), VM, 180_000)
    const [src, dst] = on === 'a1' ? [agent('a1'), agent('b1')] : [agent('b1'), agent('a1')]
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
      when: w,
      vm: VM,
      spawned,
      restartAfterMs,
    })
    // 1. exactly one copy, and one live disk: on the member that runs it (a discarded incoming disk is
    // removed by its session, or by the restarted agent's sweep).
    const runsOn = await oneCopy(pair(), VM, 180_000)
    const settledMs = Date.now() - killedAt
    for (const deadline = Date.now() + 60_000; ; await sleep(500)) {
      const disks = Object.fromEntries(pair().map((a) => [a.name, liveDisks(a)]))
      const ok = pair().every((a) => disks[a.name]!.length === (a.name === runsOn ? 1 : 0))
      if (ok) break
      assert.ok(
        Date.now() < deadline,
        `live disks of ${VM} left: ${JSON.stringify(disks)} (runs on ${runsOn})`,
      )
    }
    // 2. its disk matches its memory, and no older copy ran.
    assert.match(await blk('check'), /^OK blocks=16384 /)
    assert.match(await guestCommand(client, GUEST_IP, 'check'), /^OK/)
    const stallMs = assertNeverBack(
      await samplesAfter(reader, 3),
      `${victim}@${point}`,
      killedAt - 30_000,
      Date.now(),
    )
    const r: KillResult = {
      victim,
      point,
      fired: wasFired,
      migrateExit: mig.exitCode,
      migrateSaid: said,
      runsOn,
      settledMs,
      stallMs,
    }
    results.push(r)
    return r
  }

  it('destination killed mid-way through the disk copy → the source keeps running on its disk; the incoming disk is swept', async () => {
    const r = await killedMove('destination', 'disk-data')
    assert.ok(r.fired, 'the destination reached the point')
    assert.notEqual(r.migrateExit, 0)
  })

  it('source killed mid-way through the disk copy → the restarted source keeps the VM; the destination drops its disk', async () => {
    const r = await killedMove('source', 'disk-bulk')
    assert.ok(r.fired, 'the source reached the point')
  })

  it('destination killed in the pause (final disk set in) before its commit → the source resumes on its untouched disk', async () => {
    const r = await killedMove('destination', 'final')
    assert.ok(r.fired)
    assert.notEqual(r.migrateExit, 0)
  })

  it('source killed at the switch (guest paused) → one copy, disk consistent with memory', async () => {
    const r = await killedMove('source', 'paused')
    assert.ok(r.fired)
  })

  it('destination killed after its commit record, before the resume → re-adopted on its disk; the next move works', async () => {
    const r = await killedMove('destination', 'recorded')
    assert.ok(r.fired)
    // The next move starts from the re-adopted copy when it stayed there: QEMU still holds the writer's
    // NBD server and export of the dead agent's session.
    const from = agent(r.runsOn)
    const other = r.runsOn === 'a1' ? 'b1' : 'a1'
    await net!.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    const clean = await from.mesh(['migrate', VM, '--to', other, '--json'], { timeoutMs: 300_000 })
    assert.equal(clean.code, 0, `the clean move after the kills failed: ${clean.stderr}`)
    assert.equal(await oneCopy(pair(), VM, 60_000), other)
    assert.match(await blk('check'), /^OK blocks=16384 /)
    assert.match(await guestCommand(client, GUEST_IP, 'check'), /^OK/)
  })

  it('random kills while the disk moves (seed printed; MESH_DISK_KILLS, MESH_KILL_SEED)', async () => {
    const { seed } = await randomKills({
      label: 'random disk kills',
      killsVar: 'MESH_DISK_KILLS',
      defaultKills: 3,
      points: POINTS,
      killedMove: (victim, when, restartAfterMs) => killedMove(victim, when, restartAfterMs),
    })
    // The VM still moves, and its disk is intact where it lands.
    const on = await oneCopy(pair(), VM, 60_000)
    const other = on === 'a1' ? 'b1' : 'a1'
    await net!.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    const clean = await agent(on).mesh(['migrate', VM, '--to', other, '--json'], { timeoutMs: 300_000 })
    assert.equal(
      clean.code,
      0,
      `the clean move after the random kills failed (seed ${seed}): ${clean.stderr}`,
    )
    assert.equal(await oneCopy(pair(), VM, 60_000), other)
    assert.match(await blk('check'), /^OK blocks=16384 /)
    assert.match(await guestCommand(client, GUEST_IP, 'check'), /^OK/)
  })
})
