/**
 * Live migration under faults, end to end: agents as processes in different NAT'd clouds, a real QEMU
 * guest whose NIC is plugged into the overlay, moves triggered through the CLI, and a client in a third
 * cloud (host TAP into the guest network) that talks to the guest's memory checker and reads its
 * counter. One testnet and one guest for the whole file:
 *  - A→B→A: the in-guest counter and uptime are continuous (one TCP connection across both moves);
 *  - kill -9 of the source agent right after the destination resumed: the VM runs on the destination,
 *    and the restarted source agent stops its stale paused QEMU instead of resuming it;
 *  - the destination's uplink is cut as the switch starts (the guest paused) and restored seconds later:
 *    exactly one copy runs afterwards, memory intact, and the migrate command ends with a clear outcome
 *    (last: the relinking after the cut is the slow part, and only the VM's host must be reachable).
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { COUNTER_INTERVAL_MS, COUNTER_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines, waitForExit, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  type PeerRow,
  runGuestVm,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import {
  guestCommand,
  oneCopy as oneCopyOf,
  qemus,
  startMigrate as startMigrateOf,
  vmRows,
} from '../helpers/migration-e2e.ts'
import { waitUntil } from '../helpers/wait.ts'

const GUEST_IP = '10.99.0.10'
const VM = 'g1'

/**
 * Reads the guest's counter service on one connection and prints `<receivedAtMs> <seq> <uptimeMs>` per
 * line (plain Node, no loader: it starts fast inside the client's namespace).
 */
const COUNTER_READER = `
const net = require('node:net')
const [host, port] = process.argv.slice(1)
const s = net.connect({ host, port: Number(port) })
let buf = ''
s.on('connect', () => console.log('connected'))
s.on('data', (d) => {
  buf += d.toString()
  let i
  while ((i = buf.indexOf('\\n')) >= 0) {
    const line = buf.slice(0, i).trim()
    buf = buf.slice(i + 1)
    if (line !== '') console.log(Date.now() + ' ' + line)
  }
})
s.on('error', (e) => console.log('error ' + e.message))
s.on('close', () => { console.log('closed'); process.exit(0) })
process.on('SIGTERM', () => { console.log('closed'); process.exit(0) })
`

describe("live migration under faults across NAT'd clouds (e2e, CLI, QEMU guest)", function () {
  this.timeout(600_000)
  let net: Testnet | undefined
  let client: AgentProc
  const spawned: ChildProcess[] = []

  const agent = (name: string) => net!.agents.get(name)!

  const guest = (cmd: string) => guestCommand(client, GUEST_IP, cmd)
  const vms = (a: AgentProc) => vmRows(a, VM)
  /** Exactly one of the two runs the VM, the other holds no copy (see helpers/migration-e2e.ts). */
  const oneCopy = (names: [string, string], timeoutMs: number) =>
    oneCopyOf(
      names.map((n) => agent(n)),
      VM,
      timeoutMs,
    )
  const startMigrate = (from: AgentProc, to: string) => startMigrateOf(from, VM, to, spawned)

  function switchRecorded(a: AgentProc): boolean {
    const f = join(a.state, 'migration-switches.json')
    return existsSync(f) && VM in (JSON.parse(readFileSync(f, 'utf8')) as Record<string, unknown>)
  }

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft', 'qemu-system-x86_64', 'pgrep'] })
    const t0 = performance.now()
    const image = await ensureGuest()
    net = await createTestnet({ clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }], noJoin: true })
    const a1 = await net.join('a1')
    // The guest boots (TCG: seconds) while the other members join.
    const [, , c1] = await Promise.all([
      runGuestVm(a1, image, { name: VM, ip: `${GUEST_IP}/24`, memoryMiB: 128 }),
      net.join('b1'),
      net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] }),
    ])
    client = c1
    await net.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    assert.match(await guest('fill 16'), /^OK/)
    process.stdout.write(`      testnet and guest ready in ${Math.round(performance.now() - t0)} ms\n`)
  })

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined) {
      // What the guest and the agents said: the first thing one needs to see after a failure here.
      process.stdout.write(`${await net.diagnose()}\n`)
    }
    for (const c of spawned.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL')
    if (net !== undefined) for (const cloud of net.topo.clouds) if (cloud.isCut) await cloud.restore()
  })

  after(async () => {
    await net?.destroy()
  })

  it('A→B→A: the in-guest counter and uptime are continuous on one connection', async () => {
    const reader = client.host.spawn(process.execPath, ['-e', COUNTER_READER, GUEST_IP, String(COUNTER_PORT)])
    spawned.push(reader)
    await waitForLine(reader, /^\d+ \d+ \d+$/, 60_000)
    const moves: string[] = []
    for (const [from, to] of [
      ['a1', 'b1'],
      ['b1', 'a1'],
    ] as const) {
      const r = await agent(from).mesh(['migrate', VM, '--to', to, '--json'], { timeoutMs: 240_000 })
      assert.equal(r.code, 0, `mesh migrate ${from}→${to} failed: ${r.stderr}`)
      const rep = lastJson<{ totalMs: number; downtimeMs: number; wireBytes: number }>(r.stdout)
      moves.push(
        `${from}→${to} ${Math.round(rep.totalMs)} ms (downtime ${Math.round(rep.downtimeMs)} ms, ${rep.wireBytes} B)`,
      )
      assert.equal(await oneCopy(['a1', 'b1'], 30_000), to)
      // The counter runs again over the same connection (3 more lines), not a fixed 1.5 s.
      const lines = outputLines(reader).length
      await waitUntil('the counter to flow after the move', () => outputLines(reader).length >= lines + 3, {
        timeoutMs: 60_000,
        intervalMs: 100,
      })
    }
    assert.match(await guest('check'), /^OK/)
    assert.ok(
      reader.exitCode === null && reader.signalCode === null,
      `the counter connection ended during the moves: ${outputLines(reader).slice(-3).join(' | ')}`,
    )
    reader.kill('SIGTERM')
    await waitForExit(reader, 10_000)
    const out = outputLines(reader)
    assert.ok(
      !out.some((l) => l.startsWith('error')),
      `counter connection failed: ${out.slice(-3).join(' | ')}`,
    )
    const rows = out
      .filter((l) => /^\d+ \d+ \d+$/.test(l))
      .map((l) => l.split(' ').map(Number) as [number, number, number])
    assert.ok(rows.length > 20, `only ${rows.length} counter lines`)
    let maxGap = 0
    for (let i = 1; i < rows.length; i++) maxGap = Math.max(maxGap, rows[i]![0] - rows[i - 1]![0])
    for (let i = 1; i < rows.length; i++) {
      const [at, seq, up] = rows[i]!
      const [at0, seq0, up0] = rows[i - 1]!
      assert.equal(seq, seq0 + 1, `seq ${seq0} → ${seq} (line ${i}): the counter restarted or skipped`)
      assert.ok(up >= up0, `uptime went backwards: ${up0} → ${up} ms (line ${i})`)
      assert.ok(
        up - up0 <= maxGap + 1000,
        `uptime jumped ${up - up0} ms at line ${i} (longest stall ${maxGap} ms, received ${at - at0} ms apart)`,
      )
    }
    // Over the whole run the guest's clock never runs ahead of the wall clock.
    const [firstAt, , firstUp] = rows[0]!
    const [lastAt, , lastUp] = rows.at(-1)!
    assert.ok(lastUp - firstUp <= lastAt - firstAt + 2000, 'guest uptime ran ahead of real time')
    process.stdout.write(
      `      moves: ${moves.join(', ')}\n      counter: ${rows.length} lines (every ${COUNTER_INTERVAL_MS} ms), seq ${rows[0]![1]}..${rows.at(-1)![1]}, longest stall ${maxGap} ms, guest ${lastUp - firstUp} ms vs wall ${lastAt - firstAt} ms\n`,
    )
  })

  it('kill -9 of the source agent after the destination resumed → the VM runs on the destination; the restarted source stops its stale copy', async () => {
    const srcName = (await vms(agent('a1'))).length > 0 ? 'a1' : 'b1'
    const dstName = srcName === 'a1' ? 'b1' : 'a1'
    const src = agent(srcName)
    const dst = agent(dstName)
    const mig = startMigrate(src, dstName)
    await waitForLine(mig, /"phase":"resumed"/, 240_000)
    await src.kill()
    // What the kill left: the source's QEMU (detached, it outlives the agent) and its switch record,
    // if the agent had not finished letting go.
    const staleQemus = await qemus(src)
    const recorded = switchRecorded(src)
    assert.deepEqual(
      (await vms(dst)).map((v) => v.status),
      ['running'],
    )
    assert.match(await guest('check'), /^OK/)

    await src.restart()
    // The restarted agent must never run its copy; it learns from the destination that it lost it.
    const deadline = Date.now() + 120_000
    for (;;) {
      const rows = await vms(src)
      assert.ok(
        !rows.some((v) => v.status === 'running'),
        `the restarted source runs a copy: ${JSON.stringify(rows)}`,
      )
      if (rows.length === 0 && (await qemus(src)).length === 0 && !switchRecorded(src)) break
      if (Date.now() > deadline)
        assert.fail(`the restarted source still holds ${JSON.stringify(rows)} (qemu ${await qemus(src)})`)
      await sleep(500)
    }
    const settledMs = 120_000 - (deadline - Date.now())
    // Both hosts now hold the token of that move: the source learnt it lost the VM.
    const tokens = (a: AgentProc) =>
      (JSON.parse(readFileSync(join(a.state, 'migration-tokens.json'), 'utf8')) as Record<string, number>)[VM]
    assert.ok((tokens(dst) ?? 0) > 0)
    assert.equal(tokens(src), tokens(dst))
    assert.equal(await oneCopy([srcName, dstName], 30_000), dstName)
    assert.match(await guest('check'), /^OK/)
    process.stdout.write(
      `      kill -9 ${srcName} after resume: stale QEMU ${staleQemus.length > 0 ? 'outlived the agent' : 'already gone'}, switch record ${recorded ? 'left' : 'cleared'}; settled ${settledMs} ms after restart\n`,
    )
  })

  it("link cut during the switch (destination's uplink, until both ends drop the link) → exactly one running copy, memory intact", async () => {
    const src = (await vms(agent('a1'))).length > 0 ? 'a1' : 'b1'
    const dst = src === 'a1' ? 'b1' : 'a1'
    await net!.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    const mig = startMigrate(agent(src), dst)
    await waitForLine(mig, /"phase":"switch"/, 240_000)
    let exitedAt = 0
    mig.once('exit', () => {
      exitedAt = Date.now()
    })
    const cloud = net!.topo.cloud(agent(dst).host.cloud!)
    await cloud.cut()
    const cutAt = Date.now()
    // The link dies on both sides while the guest is paused (each end's dead timer; not a sleep tied to
    // its 4.5 s default): the agents say so, through their local control sockets.
    const linkState = async (from: string, to: string) =>
      (await agent(from).json<{ peers: PeerRow[] }>(['peers'])).peers.find((p) => p.name === to)?.link
    await waitUntil(
      'the link to die on both sides',
      async () => (await linkState(src, dst)) !== 'open' && (await linkState(dst, src)) !== 'open',
      { timeoutMs: 60_000, intervalMs: 250 },
    )
    const cutMs = Date.now() - cutAt
    await cloud.restore()
    assert.ok(await waitForExit(mig, 180_000), 'mesh migrate did not end')
    const exitedMs = exitedAt - cutAt
    const out = outputLines(mig)
    const doneLine = out.find((l) => l.startsWith('{"event":"done"'))
    const errLine = out.find((l) => l.startsWith('mesh:'))
    // A clear outcome: a report, or one error line that says where the VM is.
    if (mig.exitCode === 0) assert.ok(doneLine !== undefined, `no report: ${out.slice(-3).join(' | ')}`)
    else
      assert.match(
        errLine ?? '',
        /rolled back: VM 'g1' is running|stays paused here/,
        `unclear outcome: ${out.slice(-3).join(' | ')}`,
      )
    // Only the hosts' own view: no link is needed to list VMs (an in-doubt source needs its link to
    // the destination back, and oneCopy waits for that).
    const at = await oneCopy([src, dst], 150_000)
    const settledMs = Date.now() - cutAt
    if (mig.exitCode === 0) assert.equal(at, dst, 'the move completed, so the VM must run on the destination')
    else if (/rolled back/.test(errLine ?? ''))
      assert.equal(at, src, 'rolled back, so the VM must run on the source')
    // The client reaches the guest through the overlay: its link to the VM's host must be up.
    await net!.waitForFullMesh(['c1', at], 150_000)
    assert.match(await guest('check'), /^OK/)
    process.stdout.write(
      `      link cut (${cutMs} ms): migrate exit ${mig.exitCode} (${mig.exitCode === 0 ? 'completed' : errLine}); ended ${exitedMs} ms after the cut; the VM runs on ${at}; one copy ${settledMs} ms after the cut\n`,
    )
  })
})
