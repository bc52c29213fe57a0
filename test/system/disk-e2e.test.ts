/**
 * A stateful VM moving live between agents in NAT'd clouds, through the CLI: the Debian/PostgreSQL guest
 * runs from a writable disk on the base image `debian-pg:1` (pushed into each host's chunk store), and a
 * client member in a third cloud (host TAP into the guest network) runs pgbench and a writer of sequence
 * numbers through the tunnel for the whole test while the VM moves A→B→C→A (C, in the client's cloud,
 * never had the base: it pulls `debian-pg:1` from the members when the move asks for it). Afterwards:
 * pgbench had no failed transaction and no aborted client, every sequence number whose commit the
 * writer saw is in the table, pg_amcheck is clean, and the guest's block checker (disk vs. the
 * generations in guest RAM) says intact after each move.
 */
import assert from 'node:assert/strict'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { DEBIAN_CMDLINE, ensureDebianGuest } from '../../fixtures/guest-debian/build.ts'
import { pgBin, pgEnv } from '../../fixtures/guest-debian/client.ts'
import { BLKCHECK_PORT, PG_DATABASE, PG_PORT, PG_USER } from '../../fixtures/guest-debian/ports.ts'
import { outputLines, waitForExit, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  REPO_ROOT,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import { waitUntil } from '../helpers/wait.ts'

const GUEST_IP = '10.99.0.20'
const LINE_CLIENT = join(REPO_ROOT, 'test/helpers/line-client.ts')
const MiB = 1024 * 1024

interface MoveReport {
  event: string
  totalMs: number
  downtimeMs: number
  wireBytes: number
  diskWrittenBytes?: number
  diskSentBytes?: number
}

describe("a PostgreSQL VM with a writable disk moves across NAT'd clouds (e2e, CLI)", function () {
  this.timeout(900_000)
  let net: Testnet | undefined
  let client: AgentProc

  const pgArgs = ['-h', GUEST_IP, '-p', String(PG_PORT), '-U', PG_USER]

  async function blk(cmd: string): Promise<string> {
    const r = await client.host.exec(
      process.execPath,
      ['--import', 'tsx', LINE_CLIENT, GUEST_IP, String(BLKCHECK_PORT), cmd, '180000'],
      { timeoutMs: 200_000 },
    )
    assert.equal(r.code, 0, `blkcheck '${cmd}': ${r.stderr}`)
    return r.stdout.trim()
  }

  async function psql(sql: string): Promise<string> {
    const r = await client.host.exec(pgBin('psql'), [...pgArgs, '-d', PG_DATABASE, '-tAc', sql], {
      env: pgEnv(),
      timeoutMs: 120_000,
    })
    assert.equal(r.code, 0, `psql '${sql}': ${r.stderr}`)
    return r.stdout.trim()
  }

  async function migrate(from: AgentProc, to: string): Promise<MoveReport> {
    const r = await from.mesh(['migrate', 'pg1', '--to', to, '--json'], { timeoutMs: 600_000 })
    assert.equal(r.code, 0, `mesh migrate failed: ${r.stderr}`)
    return lastJson<MoveReport>(r.stdout)
  }

  before(async function () {
    requireOrSkip(this, {
      root: true,
      commands: ['ip', 'nft', 'qemu-system-x86_64', 'qemu-img', 'debootstrap', 'socat', pgBin('pgbench')],
    })
    const image = await ensureDebianGuest()
    net = await createTestnet({
      clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c', hosts: 2 }],
      noJoin: true,
    })
    const a1 = await net.join('a1')
    const [b1, c1] = await Promise.all([
      net.join('b1'),
      net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] }),
      net.join('c2'),
    ])
    client = c1
    await net.waitForFullMesh(['a1', 'b1', 'c1', 'c2'], 150_000)
    // The base image, pushed on both hosts (a base is distributed once; the move then skips it).
    for (const a of [a1, b1]) {
      const r = await a.mesh(['image', 'push', image.disk, '--name', 'debian-pg:1', '--json'], {
        timeoutMs: 300_000,
      })
      assert.equal(r.code, 0, `image push on ${a.name}: ${r.stderr}`)
    }
    const spec = join(a1.state, 'pg1.vm.json')
    writeFileSync(
      spec,
      JSON.stringify({
        name: 'pg1',
        memoryMiB: 384,
        kernel: image.kernel,
        initrd: image.initrd,
        ip: `${GUEST_IP}/24`,
        cmdline: DEBIAN_CMDLINE,
        disk: { base: 'debian-pg:1', sizeGiB: 4 },
      }),
    )
    const run = await a1.mesh(['vm', 'run', spec], { timeoutMs: 180_000 })
    assert.equal(run.code, 0, `mesh vm run: ${run.stderr}`)
    const deadline = Date.now() + 180_000
    for (;;) {
      const c = await a1.mesh(['vm', 'console', 'pg1'])
      if (/MESH-GUEST-READY/.test(c.stdout)) break
      if (Date.now() > deadline) throw new Error(`pg1 not ready:\n${c.stdout.slice(-2000)}`)
      await new Promise((r) => setTimeout(r, 1000))
    }
  })

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined)
      process.stdout.write(`${await net.diagnose()}\n`)
  })

  after(async () => {
    await net?.destroy()
  })

  it('pgbench and a sequence writer run through A→B→C→A: nothing failed, nothing lost, disk intact', async () => {
    const a1 = net!.agents.get('a1')!
    const b1 = net!.agents.get('b1')!
    const c2 = net!.agents.get('c2')!
    const vmsOn = async (a: AgentProc) =>
      (await a.json<{ vms: { name: string; status: string }[] }>(['vm', 'ls'])).vms.map((v) => [
        v.name,
        v.status,
      ])
    const env = pgEnv()
    const init = await client.host.exec(pgBin('pgbench'), [...pgArgs, '-i', '-s', '4', '-q', PG_DATABASE], {
      env,
      timeoutMs: 300_000,
    })
    assert.equal(init.code, 0, `pgbench -i: ${init.stderr}`)
    await psql('CREATE TABLE IF NOT EXISTS seqs (v bigint PRIMARY KEY)')
    assert.match(await blk('fill 32'), /^OK blocks=8192 /)
    assert.match(await blk('churn 0.5 4'), /^OK churn=0.5 /)

    // pgbench for the whole test (it is stopped after the moves, with -T far beyond them).
    const bench = client.host.spawn(
      pgBin('pgbench'),
      [...pgArgs, '-c', '2', '-T', '3600', '-P', '2', '--failures-detailed', PG_DATABASE],
      { env },
    )
    // One session that commits a sequence number every 50 ms and says which commits it saw.
    const writer = client.host.spawn(
      pgBin('psql'),
      [...pgArgs, '-d', PG_DATABASE, '-v', 'ON_ERROR_STOP=1', '-qAt'],
      {
        env,
        stdio: ['pipe', 'pipe', 'pipe'],
      },
    )
    let seq = 0
    const feed = setInterval(() => {
      seq++
      writer.stdin?.write(`INSERT INTO seqs VALUES (${seq});\n\\echo committed ${seq}\n`)
    }, 50)
    try {
      await waitForLine(writer, /committed 20\b/, 120_000)
      await waitForLine(bench, /progress: /, 120_000)

      const line = (what: string, m: MoveReport) =>
        `${what}: ${Math.round(m.totalMs)} ms, down ${Math.round(m.downtimeMs)} ms, wire ${(m.wireBytes / MiB).toFixed(1)} MiB (disk sent ${((m.diskSentBytes ?? 0) / MiB).toFixed(2)} of ${((m.diskWrittenBytes ?? 0) / MiB).toFixed(1)} MiB written)`
      const ab = await migrate(client, 'b1')
      assert.equal(ab.event, 'done')
      assert.match(await blk('check'), /^OK blocks=8192 /)
      assert.deepEqual(await vmsOn(b1), [['pg1', 'running']])
      assert.deepEqual(await vmsOn(a1), [])

      // C never had the base: the move has it pull debian-pg:1 from the members first.
      const bc = await migrate(b1, 'c2')
      assert.equal(bc.event, 'done')
      assert.match(await blk('check'), /^OK blocks=8192 /)
      assert.deepEqual(await vmsOn(c2), [['pg1', 'running']])
      assert.deepEqual(await vmsOn(b1), [])

      assert.match(await blk('churn 0'), /^OK churn=0 /)
      const ca = await migrate(c2, 'a1')
      assert.match(await blk('check'), /^OK blocks=8192 /)
      assert.deepEqual(await vmsOn(a1), [['pg1', 'running']])
      process.stdout.write(`      ${line('A→B', ab)}\n      ${line('B→C', bc)}\n      ${line('C→A', ca)}\n`)
      // Both clients go on after the last move: two more pgbench progress reports and 20 more commits
      // (awaited, not a fixed 3 s plus a count of reports, which a faster box's shorter moves undercut).
      const progressAt = outputLines(bench).filter((l) => l.startsWith('progress:')).length
      const seqAt = seq
      await waitUntil(
        'pgbench and the writer after the last move',
        () =>
          outputLines(bench).filter((l) => l.startsWith('progress:')).length >= progressAt + 2 &&
          outputLines(writer).some((l) => l === `committed ${seqAt + 20}`),
        { timeoutMs: 60_000, intervalMs: 100 },
      )
    } finally {
      clearInterval(feed)
      writer.stdin?.end('\\q\n')
    }
    await waitForExit(writer, 60_000)
    bench.kill('SIGINT')
    await waitForExit(bench, 60_000)
    const committed = outputLines(writer)
      .map((l) => /^committed (\d+)$/.exec(l)?.[1])
      .filter((v): v is string => v !== undefined)
      .map(Number)
    assert.equal(
      writer.exitCode,
      0,
      `the writer's session broke: ${outputLines(writer).slice(-5).join(' | ')}`,
    )
    assert.ok(committed.length >= 20)
    const rows = new Set((await psql('SELECT v FROM seqs')).split('\n').map(Number))
    const missing = committed.filter((v) => !rows.has(v))
    assert.deepEqual(missing, [], 'every commit the writer saw is in the table')
    const benchOut = outputLines(bench)
    const progress = benchOut.filter((l) => l.startsWith('progress:'))
    // It ran through the moves: reports from before the first move on (awaited above) to after the
    // last, and the last one shows transactions going through (a stalled pgbench reports 0 tps).
    const lastTps = Number(/([\d.]+) tps/.exec(progress.at(-1) ?? '')?.[1])
    assert.ok(lastTps > 0, `pgbench after the moves: ${progress.slice(-3).join(' | ')}`)
    assert.deepEqual(
      benchOut.filter((l) => /aborted|error|connection .* lost|FATAL/i.test(l)),
      [],
      'pgbench: no aborted client, no error',
    )
    for (const l of progress) assert.match(l, /, 0 failed/, `pgbench failures: ${l}`)
    const amcheck = await client.host.exec(
      pgBin('pg_amcheck'),
      [...pgArgs, '-d', PG_DATABASE, '--heapallindexed'],
      { env, timeoutMs: 300_000 },
    )
    assert.equal(amcheck.code, 0, `pg_amcheck: ${amcheck.stdout}${amcheck.stderr}`)
    process.stdout.write(
      `      ${committed.length} sequence commits, all present; pgbench ${progress.length} progress lines, 0 failed; pg_amcheck clean\n`,
    )
  })
})
