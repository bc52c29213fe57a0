/**
 * A warm standby carries the VM's writable disk too (#17): the Debian guest runs from a writable disk
 * whose overlay holds 64 MiB of the block checker's data (blkcheck, churning). A cold move (to a member
 * that holds nothing of it) sends the whole overlay; then the VM gets a standby, which receives its RAM
 * and its disk chunks in the background (later passes read only what QEMU's dirty bitmap saw), and
 * `mesh evacuate --to` the standby sends only what changed since the last sync: the destination's
 * disk receiver finds the rest in its chunk store. The block checker (disk against the generations in
 * guest RAM) says intact after each move. Agents in NAT'd clouds, through the CLI.
 */
import assert from 'node:assert/strict'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { DEBIAN_CMDLINE, ensureDebianGuest } from '../../fixtures/guest-debian/build.ts'
import { BLKCHECK_PORT } from '../../fixtures/guest-debian/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  REPO_ROOT,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import { waitUntil } from '../helpers/wait.ts'

const GUEST_IP = '10.99.0.21'
const LINE_CLIENT = join(REPO_ROOT, 'test/helpers/line-client.ts')
const MiB = 1024 * 1024

interface StandbyView {
  state: string
  peerName?: string
  passes: number
  lagBytes?: number
  disk?: { heldBytes: number; lagBytes: number; error?: string }
  lastPass?: { fetchedBytes: number; diskFetchedBytes?: number }
}

describe('a warm standby carries the writable disk: an evacuation to it sends only what changed (e2e, CLI)', function () {
  this.timeout(600_000)
  let net: Testnet | undefined
  let client: AgentProc

  async function blk(cmd: string): Promise<string> {
    const r = await client.host.exec(
      process.execPath,
      ['--import', 'tsx', LINE_CLIENT, GUEST_IP, String(BLKCHECK_PORT), cmd, '180000'],
      { timeoutMs: 200_000 },
    )
    assert.equal(r.code, 0, `blkcheck '${cmd}': ${r.stderr}`)
    return r.stdout.trim()
  }

  const vmsOn = async (a: AgentProc) =>
    (await a.json<{ vms: { name: string; status: string }[] }>(['vm', 'ls'])).vms.map((v) => [
      v.name,
      v.status,
    ])

  before(async function () {
    requireOrSkip(this, {
      root: true,
      commands: ['ip', 'nft', 'qemu-system-x86_64', 'qemu-img', 'debootstrap', 'socat'],
    })
    const image = await ensureDebianGuest()
    net = await createTestnet({
      clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c', hosts: 2 }],
      noJoin: true,
    })
    const a1 = await net.join('a1')
    const [b1, c1, c2] = await Promise.all([
      net.join('b1'),
      net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] }),
      net.join('c2'),
    ])
    client = c1
    await net.waitForFullMesh(['a1', 'b1', 'c1', 'c2'], 150_000)
    // The base on every host that runs the VM (a base is distributed once; moves skip it).
    await Promise.all(
      [a1, b1, c2].map(async (a) => {
        const r = await a.mesh(['image', 'push', image.disk, '--name', 'debian-pg:1', '--json'], {
          timeoutMs: 300_000,
        })
        assert.equal(r.code, 0, `image push on ${a.name}: ${r.stderr}`)
      }),
    )
    const spec = join(a1.state, 'sd1.vm.json')
    writeFileSync(
      spec,
      JSON.stringify({
        name: 'sd1',
        memoryMiB: 384,
        kernel: image.kernel,
        initrd: image.initrd,
        ip: `${GUEST_IP}/24`,
        cmdline: DEBIAN_CMDLINE,
        disk: { base: 'debian-pg:1', sizeGiB: 2 },
      }),
    )
    const run = await a1.mesh(['vm', 'run', spec], { timeoutMs: 180_000 })
    assert.equal(run.code, 0, `mesh vm run: ${run.stderr}`)
    await waitUntil(
      'sd1 ready',
      async () => /MESH-GUEST-READY/.test((await a1.mesh(['vm', 'console', 'sd1'])).stdout),
      { timeoutMs: 180_000, intervalMs: 1000 },
    )
  })

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined)
      process.stdout.write(`${await net.diagnose()}\n`)
  })

  after(async () => {
    await net?.destroy()
  })

  it('cold move sends the overlay; the move to the standby sends a fraction of it; disk intact', async () => {
    const a1 = net!.agents.get('a1')!
    const b1 = net!.agents.get('b1')!
    const c2 = net!.agents.get('c2')!
    assert.match(await blk('fill 64'), /^OK blocks=16384 /)
    assert.match(await blk('churn 0.25 2'), /^OK churn=0.25 /)

    // Cold: c2 holds nothing of this disk.
    const mv = await a1.mesh(['migrate', 'sd1', '--to', 'c2', '--json'], { timeoutMs: 300_000 })
    assert.equal(mv.code, 0, `mesh migrate: ${mv.stderr}`)
    const coldReport = lastJson<{ event: string; diskSentBytes?: number; diskWrittenBytes?: number }>(
      mv.stdout,
    )
    assert.equal(coldReport.event, 'done')
    assert.match(await blk('check'), /^OK blocks=16384 /)
    assert.deepEqual(await vmsOn(c2), [['sd1', 'running']])
    const coldSent = coldReport.diskSentBytes ?? 0
    assert.ok(coldSent >= 60 * MiB, `the cold move sent ${coldSent} disk bytes, less than the 64 MiB fill`)

    // The standby on b1: its passes carry the disk too; the second one reads only what changed.
    const set = await c2.mesh(['vm', 'set', 'sd1', '--standby', 'b1', '--standby-rate', '64M'])
    assert.equal(set.code, 0, set.stderr)
    let sb: StandbyView | undefined
    await waitUntil(
      'a second standby pass of sd1 with its disk',
      async () => {
        const ls = await c2.json<{ vms: { name: string; standby?: StandbyView }[] }>(['vm', 'ls'])
        sb = ls.vms.find((v) => v.name === 'sd1')?.standby
        assert.equal(sb?.disk?.error, undefined, `standby disk error: ${sb?.disk?.error}`)
        return sb?.state === 'synced' && sb.passes >= 2 && sb.lastPass?.diskFetchedBytes !== undefined
      },
      { timeoutMs: 180_000, intervalMs: 1000 },
    )
    assert.ok((sb!.disk?.heldBytes ?? 0) >= 64 * MiB, `standby disk held ${sb!.disk?.heldBytes}`)
    assert.ok(
      sb!.lastPass!.diskFetchedBytes! < 16 * MiB,
      `the second pass fetched ${sb!.lastPass!.diskFetchedBytes} disk bytes: it should carry only what changed`,
    )
    const table = await c2.mesh(['vm', 'ls'])
    assert.match(table.stdout, /sd1 .*b1 lag /)

    const ev = await c2.mesh(['evacuate', '--to', 'b1', '--json'], { timeoutMs: 300_000 })
    assert.equal(ev.code, 0, `mesh evacuate: ${ev.stderr}`)
    const report = lastJson<{
      complete: boolean
      vms: { vm: string; outcome: string; diskSentBytes?: number; diskDedupBytes?: number }[]
    }>(ev.stdout)
    assert.equal(report.complete, true, JSON.stringify(report))
    const moved = report.vms.find((v) => v.vm === 'sd1')!
    assert.equal(moved.outcome, 'moved')
    assert.match(await blk('check'), /^OK blocks=16384 /)
    assert.deepEqual(await vmsOn(b1), [['sd1', 'running']])
    const warmSent = moved.diskSentBytes ?? Number.NaN
    process.stdout.write(
      `      disk sent: cold ${(coldSent / MiB).toFixed(1)} MiB, to the standby ${(warmSent / MiB).toFixed(1)} MiB (held there ${((moved.diskDedupBytes ?? 0) / MiB).toFixed(1)} MiB)\n`,
    )
    assert.ok(warmSent * 5 < coldSent, `to the standby: ${warmSent} disk bytes, cold ${coldSent}`)
    assert.ok((moved.diskDedupBytes ?? 0) >= 60 * MiB, `the standby held ${moved.diskDedupBytes} disk bytes`)
    assert.match(await blk('churn 0'), /^OK churn=0 /)
  })
})
