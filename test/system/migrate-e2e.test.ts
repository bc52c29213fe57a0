/**
 * Live migration end to end between agents in different NAT'd clouds, through the CLI, with a real
 * QEMU guest whose NIC is plugged into the overlay: a client in a third cloud (host TAP into the guest
 * network) keeps a TCP echo stream open while the VM moves A→B→A; the guest's memory checker must
 * report intact after each move and the return move must put ≤ 5% of the RAM on the wire.
 */
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { ECHO_PORT, MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines, waitForExit, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  REPO_ROOT,
  runGuestVm,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'

const GUEST_IP = '10.99.0.10'
const LINE_CLIENT = join(REPO_ROOT, 'test/helpers/line-client.ts')
const STREAM_CLIENT = join(REPO_ROOT, 'fixtures/testnet/stream-client.ts')

interface MigrateReport {
  event: string
  totalMs: number
  downtimeMs: number
  wireBytes: number
}

describe("live migration across NAT'd clouds (e2e, CLI, QEMU guest, tunnel)", function () {
  this.timeout(600_000)
  let net: Testnet | undefined
  let client: AgentProc

  async function guest(cmd: string): Promise<string> {
    const r = await client.host.exec(
      process.execPath,
      ['--import', 'tsx', LINE_CLIENT, GUEST_IP, String(MEMCHECK_PORT), cmd],
      {
        timeoutMs: 90_000,
      },
    )
    assert.equal(r.code, 0, `memcheck '${cmd}': ${r.stderr}`)
    return r.stdout.trim()
  }

  async function migrate(from: AgentProc, vm: string, to: string): Promise<MigrateReport> {
    const r = await from.mesh(['migrate', vm, '--to', to, '--json'], { timeoutMs: 300_000 })
    assert.equal(r.code, 0, `mesh migrate failed: ${r.stderr}`)
    return lastJson<MigrateReport>(r.stdout)
  }

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft', 'qemu-system-x86_64', 'socat'] })
    const image = await ensureGuest()
    net = await createTestnet({ clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }], noJoin: true })
    await net.join('a1')
    await net.join('b1')
    client = await net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] })
    await net.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    await runGuestVm(net.agents.get('a1')!, image, { name: 'g1', ip: `${GUEST_IP}/24` })
  })

  afterEach(async function () {
    // A guest lost after a move (seen once in CI): where it runs, its console, the tunnel's view.
    if (this.currentTest?.state === 'failed' && net !== undefined)
      process.stdout.write(`${await net.diagnose()}\n`)
  })

  after(async () => {
    await net?.destroy()
  })

  it('moves A→B→A with memory intact and a TCP stream that survives', async () => {
    const a1 = net!.agents.get('a1')!
    const b1 = net!.agents.get('b1')!
    assert.match(await guest('fill 32'), /^OK/)
    const stream = client.host.spawn(process.execPath, [
      '--import',
      'tsx',
      STREAM_CLIENT,
      GUEST_IP,
      String(ECHO_PORT),
      '600000',
    ])
    await waitForLine(stream, /^connected/, 60_000) // the stream is up and echoing before the move

    // Triggered from a third member: the request is forwarded to the VM's host.
    const there = await migrate(client, 'g1', 'b1')
    assert.equal(there.event, 'done')
    assert.match(await guest('check'), /^OK/)
    const onB = await b1.json<{ vms: { name: string; status: string }[] }>(['vm', 'ls'])
    assert.deepEqual(
      onB.vms.map((v) => [v.name, v.status]),
      [['g1', 'running']],
    )
    const onA = await a1.json<{ vms: { name: string }[] }>(['vm', 'ls'])
    assert.equal(onA.vms.length, 0, 'the source must not keep a copy')

    const back = await migrate(b1, 'g1', 'a1')
    assert.match(await guest('check'), /^OK/)
    assert.ok(
      back.wireBytes <= 0.05 * 256 * 1024 * 1024,
      `return move put ${back.wireBytes} bytes on the wire`,
    )

    stream.kill('SIGTERM')
    await waitForExit(stream, 30_000)
    const res = JSON.parse(
      outputLines(stream)
        .filter((l) => l.startsWith('{'))
        .at(-1) ?? '{}',
    ) as {
      connected: boolean
      resets: number
      mismatches: number
      bytesEchoed: number
      maxGapMs: number
    }
    process.stdout.write(
      `      moves: there ${there.totalMs} ms (downtime ${there.downtimeMs} ms, ${there.wireBytes} B), back ${back.totalMs} ms (downtime ${back.downtimeMs} ms, ${back.wireBytes} B); stream ${res.bytesEchoed} B echoed, longest gap ${res.maxGapMs} ms\n`,
    )
    assert.equal(res.connected, true)
    assert.equal(res.resets, 0)
    assert.equal(res.mismatches, 0)
    assert.ok(res.bytesEchoed > 0)
  })

  it('kill -9 of the destination agent during pre-copy leaves the VM running on the source only', async () => {
    const a1 = net!.agents.get('a1')!
    const b1 = net!.agents.get('b1')!
    // Fill more RAM so the pre-copy lasts long enough to kill the destination in the middle of it.
    assert.match(await guest('fill 96'), /^OK/)
    const mig = a1.host.spawn(process.execPath, [
      join(REPO_ROOT, 'bin/mesh.js'),
      'migrate',
      'g1',
      '--to',
      'b1',
      '--json',
      '--state',
      a1.state,
    ])
    await waitForLine(mig, /"phase":"(bulk|precopy)"/, 120_000)
    await b1.kill()
    await waitForExit(mig, 120_000)
    assert.notEqual(mig.exitCode, 0, 'the migration must fail')
    const onA = await a1.json<{ vms: { name: string; status: string }[] }>(['vm', 'ls'])
    assert.deepEqual(
      onA.vms.map((v) => [v.name, v.status]),
      [['g1', 'running']],
    )
    assert.match(await guest('check'), /^OK/)
    await b1.restart()
    const onB = await b1.json<{ vms: unknown[] }>(['vm', 'ls'])
    assert.equal(onB.vms.length, 0, 'the destination must hold no VM')
  })
})
