/**
 * Live migration of a VM with a writable disk, real QEMU (two hosts in one process, memory link): the
 * Debian guest's block checker fills and keeps rewriting blocks on its disk while the VM moves A→B→A;
 * after each move the checker, reading every block back from the disk with O_DIRECT and comparing it
 * with the generations it keeps in guest RAM, says intact (the disk matches the memory), and so does
 * the memory checker. The source's disk is gone once the destination runs the VM.
 */
import assert from 'node:assert/strict'
import { existsSync, readdirSync, rmSync } from 'node:fs'
import { DEBIAN_CMDLINE, ensureDebianGuest } from '../../fixtures/guest-debian/build.ts'
import { BLKCHECK_PORT } from '../../fixtures/guest-debian/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { createLogger } from '../../src/base/log.ts'
import { previousSincePath, previousVolumePath } from '../../vm/disk/previous.ts'
import type { MigrationReport } from '../../vm/migration/interfaces.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { createTwoHosts, type TestHost, type TwoHosts } from '../bench/_migrate-hosts.ts'
import { LineClient } from '../helpers/vm.ts'
import { holdsWithin, waitUntil } from '../helpers/wait.ts'

const MiB = 1024 * 1024
/** vm/migration/fault-points.ts: the hook a test installs to fail a move at a named point. */
const FAULT_HOOK = Symbol.for('mesh.migration.faultHook')

/** Incoming disks (`<vm>.in-<hex>.qcow2`) in a host's disk dir. */
function incomingDisks(dir: string): string[] {
  return readdirSync(dir).filter((n) => /\.in-[0-9a-f]{8}\.qcow2$/.test(n))
}

async function ask(port: number, cmd: string): Promise<string> {
  const c = await LineClient.connect(port, 60_000)
  try {
    return await c.command(cmd, 180_000)
  } finally {
    c.close()
  }
}

function line(r: MigrationReport): string {
  return `total ${Math.round(r.totalMs)} ms, downtime ${Math.round(r.downtimeMs)} ms, wire ${(r.wireBytes / MiB).toFixed(1)} MiB (disk: written ${((r.diskWrittenBytes ?? 0) / MiB).toFixed(1)} MiB, sent ${((r.diskSentBytes ?? 0) / MiB).toFixed(1)} MiB, held ${((r.diskDedupBytes ?? 0) / MiB).toFixed(1)} MiB, read ${((r.diskReadBytes ?? 0) / MiB).toFixed(1)} MiB${r.diskSeeded === true ? ', seeded' : ''}), rounds ${r.rounds}, ${r.switchReason}`
}

describe('live migration of a writable disk (real QEMU, Debian guest, block checker)', function () {
  this.timeout(900_000)
  let hosts: TwoHosts | undefined

  before(async function () {
    requireOrSkip(this, {
      root: true,
      commands: ['qemu-system-x86_64', 'qemu-img', 'debootstrap', 'mkfs.ext4'],
    })
    await ensureDebianGuest()
    hosts = await createTwoHosts({
      tag: 'dskm',
      log: createLogger({ level: 'error' }),
      guestPorts: [BLKCHECK_PORT],
    })
  })

  after(async () => {
    if (hosts === undefined) return
    // A disk a VM left behind is kept on purpose (a move back reuses it); the test removes it.
    for (const h of [hosts.a, hosts.b]) {
      rmSync(previousVolumePath(h.diskDir, 'dsk-g'), { force: true })
      rmSync(previousSincePath(h.diskDir, 'dsk-g'), { force: true })
    }
    const left = await hosts.destroy()
    assert.deepEqual(left, [], 'files left behind')
  })

  it('moves A→B→A while the guest writes: disk and memory intact, the source’s disk gone', async () => {
    const { a, b } = hosts!
    const image = await ensureDebianGuest()
    const spec = validateVmSpec({
      name: 'dsk-g',
      memoryMiB: 384,
      kernel: image.kernel,
      initrd: image.initrd,
      ip: '10.0.2.15/24',
      cmdline: `${DEBIAN_CMDLINE} mesh.gw=10.0.2.2 mesh.name=dsk-g`,
      disk: { base: image.disk, sizeGiB: 3 },
    })
    const vmA = await hosts!.boot(a, spec)
    const blk = (on: TestHost, cmd: string) => ask(on.ports.get(BLKCHECK_PORT)!, cmd)
    const mem = (on: TestHost, cmd: string) => ask(on.memPort, cmd)
    assert.match(await blk(a, 'fill 48'), /^OK blocks=12288 /)
    assert.match(await mem(a, 'fill 16'), /^OK /)
    assert.match(await blk(a, 'churn 1 8'), /^OK churn=1 /)
    const pathA = vmA.volumePath!

    const there = await a.service.migrate({ vm: 'dsk-g', to: 'B' })
    process.stdout.write(`      A→B: ${line(there)}\n`)
    assert.equal(b.host.get('dsk-g')?.status(), 'running')
    assert.equal(a.host.get('dsk-g'), undefined)
    assert.equal(existsSync(pathA), false, "the source's disk is no longer the VM's once B runs it")
    assert.ok((there.diskWrittenBytes ?? 0) >= 48 * MiB, 'the overlay held the written blocks')
    const c1 = await blk(b, 'check')
    assert.match(c1, /^OK blocks=12288 /, `block checker after A→B: ${c1}`)
    assert.match(await mem(b, 'check'), /^OK /)

    // A kept its disk as the VM's previous disk, and B counts the guest's writes since it arrived:
    // after a little change on B, A starts from its old disk and B reads and sends only what changed.
    const prevA = previousVolumePath(a.diskDir, 'dsk-g')
    assert.equal(existsSync(prevA), true, 'A keeps the disk the VM left')
    const writtenA = there.diskWrittenBytes ?? 0
    assert.match(await blk(b, 'churn 0'), /^OK churn=0 /)
    assert.match(await blk(b, 'dirty 1'), /^OK dirtied=256 /)
    const back = await b.service.migrate({ vm: 'dsk-g', to: 'A' })
    process.stdout.write(`      B→A: ${line(back)}\n`)
    assert.equal(a.host.get('dsk-g')?.status(), 'running')
    const c2 = await blk(a, 'check')
    assert.match(c2, /^OK blocks=12288 /, `block checker after B→A: ${c2}`)
    assert.match(await mem(a, 'check'), /^OK /)
    assert.equal(back.diskSeeded, true, 'A started from the disk the VM left there')
    for (const [what, n] of [
      ['sent', back.diskSentBytes],
      ['read', back.diskReadBytes],
    ] as const)
      assert.ok(
        (n ?? Number.POSITIVE_INFINITY) <= 0.05 * writtenA,
        `the return move ${what} ${n} disk bytes of ${writtenA} written (> 5%)`,
      )
    assert.equal(existsSync(prevA), false, 'the disk A kept is the VM’s disk again')
    assert.equal(existsSync(previousSincePath(a.diskDir, 'dsk-g')), false)
    const prevB = previousVolumePath(b.diskDir, 'dsk-g')
    assert.equal(existsSync(prevB), true, 'B now keeps the disk the VM left')

    // Once more A→B (B starts from what it kept), then a seeded B→A that fails on A after its first
    // disk chunks went into the seeded disk: the guest runs on on B, and A keeps that disk as the VM's
    // previous disk, without a record (it is no longer exactly the end of A→B). The retry takes the
    // full path (every written chunk read and offered) but fills from that disk by hash, so it sends
    // little; before, the failed attempt removed A's disk and the retry sent all of it.
    assert.match(await blk(a, 'dirty 1'), /^OK dirtied=256 /)
    const again = await a.service.migrate({ vm: 'dsk-g', to: 'B' })
    process.stdout.write(`      A→B: ${line(again)}\n`)
    assert.equal(again.diskSeeded, true, 'B started from the disk the VM left there')
    assert.match(await blk(b, 'check'), /^OK blocks=12288 /)
    assert.match(await blk(b, 'dirty 1'), /^OK dirtied=256 /)
    assert.equal(existsSync(previousSincePath(a.diskDir, 'dsk-g')), true, 'A can seed the next return')
    let fired = false
    ;(globalThis as Record<symbol, unknown>)[FAULT_HOOK] = (point: string) => {
      if (point !== 'destination:disk-data' || fired) return
      fired = true
      throw new Error('injected fault: A fails after its first disk chunks')
    }
    try {
      await assert.rejects(b.service.migrate({ vm: 'dsk-g', to: 'A' }), /injected fault/)
    } finally {
      delete (globalThis as Record<symbol, unknown>)[FAULT_HOOK]
    }
    assert.equal(fired, true, 'the seeded return failed after it wrote into the seeded disk')
    // A discards its incoming copy (its `.in-` disk goes), B runs the guest on its own disk.
    await waitUntil('A to discard the failed incoming copy', () => incomingDisks(a.diskDir).length === 0, {
      timeoutMs: 120_000,
    })
    assert.equal(a.host.get('dsk-g'), undefined)
    await waitUntil('the guest to run on B again', () => b.host.get('dsk-g')?.status() === 'running', {
      timeoutMs: 120_000,
    })
    const cf = await blk(b, 'check')
    assert.match(cf, /^OK blocks=12288 /, `block checker on B after the failed return: ${cf}`)
    assert.match(await mem(b, 'check'), /^OK /)
    assert.equal(existsSync(prevA), true, 'A kept the seeded disk of the failed return')
    assert.equal(existsSync(previousSincePath(a.diskDir, 'dsk-g')), false, 'without a record')
    const full = await b.service.migrate({ vm: 'dsk-g', to: 'A' })
    process.stdout.write(`      B→A (retry after a failed seeded return: full path): ${line(full)}\n`)
    assert.equal(full.diskSeeded, false)
    assert.ok((full.diskReadBytes ?? 0) >= 48 * MiB, 'the full path reads every written chunk')
    assert.ok(
      (full.diskSentBytes ?? Number.POSITIVE_INFINITY) <= 0.05 * writtenA,
      `the retry sent ${full.diskSentBytes} disk bytes of ${writtenA} written (> 5%): A lost the disk it kept`,
    )
    const c3 = await blk(a, 'check')
    assert.match(c3, /^OK blocks=12288 /, `block checker after the full return: ${c3}`)
    assert.match(await mem(a, 'check'), /^OK /)
    process.stdout.write(
      `      return move seeded vs full: ${Math.round(back.totalMs)} vs ${Math.round(full.totalMs)} ms, read ${((back.diskReadBytes ?? 0) / MiB).toFixed(1)} vs ${((full.diskReadBytes ?? 0) / MiB).toFixed(1)} MiB, sent ${((back.diskSentBytes ?? 0) / MiB).toFixed(1)} vs ${((full.diskSentBytes ?? 0) / MiB).toFixed(1)} MiB\n`,
    )
    // A drops the old disk it filled from as the VM runs there again (bounded wait).
    await holdsWithin(() => !existsSync(prevA), 10_000)
    assert.equal(existsSync(prevA), false, 'A dropped its previous disk once the VM ran there again')
    assert.equal(existsSync(prevB), true, 'B keeps the disk the VM left')
  })
})
