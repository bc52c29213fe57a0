/**
 * A VM's writable disk on real QEMU: the driver creates a qcow2 overlay on the Debian guest's base,
 * the guest boots from it, and the disk tracker (QEMU dirty bitmaps read over NBD, vm/disk) reports
 * what the overlay holds and what each round dirtied; its NBD client's view matches libnbd's
 * (`nbdinfo --map`, `nbdcopy`) on the same export. stop() removes the disk.
 */
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { closeSync, existsSync, mkdtempSync, openSync, readSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { DEBIAN_CMDLINE, ensureDebianGuest } from '../../fixtures/guest-debian/build.ts'
import { BLKCHECK_PORT } from '../../fixtures/guest-debian/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { extentsToChunks } from '../../vm/disk/tracker.ts'
import { volumeInfo } from '../../vm/disk/volume.ts'
import type { Vm, VmDriver } from '../../vm/driver/interfaces.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { cleanupVmDirs, freePort, LineClient, vmTestDirs, waitConsole } from '../helpers/vm.ts'

const run = promisify(execFile)
const GiB = 1024 * 1024 * 1024

describe('writable disks on QEMU (qcow2 overlay, dirty bitmaps over NBD)', function () {
  this.timeout(600_000)
  const dirs = vmTestDirs('disk')
  let diskDir: string
  let driver: VmDriver
  let vm: Vm | undefined
  let blkPort: number

  before(async function () {
    requireOrSkip(this, {
      root: true,
      commands: ['qemu-system-x86_64', 'qemu-img', 'debootstrap', 'mkfs.ext4', 'nbdinfo', 'nbdcopy'],
    })
    const image = await ensureDebianGuest()
    diskDir = mkdtempSync(join(tmpdir(), 'mvt-disks-'))
    driver = createQemuDriver({ ...dirs, diskDir, startTimeoutMs: 120_000, commandTimeoutMs: 120_000 })
    blkPort = await freePort()
    const spec = validateVmSpec({
      name: 'pg1',
      memoryMiB: 384,
      kernel: image.kernel,
      initrd: image.initrd,
      ip: '10.0.2.15/24',
      cmdline: `${DEBIAN_CMDLINE} mesh.gw=10.0.2.2`,
      disk: { base: image.disk, sizeGiB: 3 },
    })
    vm = await driver.start(spec, { testNet: { hostfwd: [{ hostPort: blkPort, guestPort: BLKCHECK_PORT }] } })
    await waitConsole(vm, /MESH-GUEST-READY/)
  })

  after(async () => {
    await vm?.stop().catch(() => {})
    await cleanupVmDirs(dirs)
    if (diskDir !== undefined) rmSync(diskDir, { recursive: true, force: true })
  })

  it('boots from an overlay of the requested size on the read-only base', async () => {
    assert.ok(vm!.volumePath !== undefined && existsSync(vm!.volumePath))
    const info = await volumeInfo(vm!.volumePath!)
    assert.equal(info.size, 3 * GiB)
    assert.equal(info.baseFormat, 'raw')
    // The guest grew its filesystem to the disk (resize2fs in its init) and writes to it.
    const blk = await LineClient.connect(blkPort, 30_000)
    try {
      assert.match(await blk.command('fill 4', 120_000), /^OK blocks=1024 /)
      assert.match(await blk.command('check', 120_000), /^OK /)
    } finally {
      blk.close()
    }
  })

  it('tracks written and dirty chunks; its NBD view equals libnbd’s on the same export', async () => {
    const tracker = vm!.diskTracker!()!
    const blk = await LineClient.connect(blkPort, 30_000)
    try {
      await tracker.open()
      assert.equal(tracker.size, 3 * GiB)
      await tracker.start()
      assert.match(await blk.command('dirty 2', 120_000), /^OK dirtied=512 /)
      const r1 = await tracker.collect()
      // 2 MiB of blocks in a file: at least 32 chunks of 64 KiB (plus the filesystem's own writes).
      assert.ok(r1.chunks.length >= 32, `round 1 saw ${r1.chunks.length} chunks`)
      assert.ok(r1.chunks.length < 400, `round 1 saw ${r1.chunks.length} chunks`)
      assert.deepEqual(
        r1.chunks,
        [...r1.chunks].sort((a, b) => a - b),
      )

      // Guest paused (QEMU drained its I/O): the overlay's chunks and the data as libnbd sees them.
      await vm!.pause()
      try {
        const quiet = await tracker.collect()
        await tracker.collect()
        const idle = await tracker.collect()
        assert.equal(idle.chunks.length, 0, 'a paused guest dirties nothing')
        process.stdout.write(
          `      round: ${r1.chunks.length} chunks in ${r1.scanMs.toFixed(1)} ms; pause round ${quiet.chunks.length}; idle round ${idle.scanMs.toFixed(1)} ms\n`,
        )
        const written = await tracker.written()
        const uri = `nbd+unix:///mesh-disk?socket=${join(driver.handle(vm!).paths.dir!, 'nbd.sock')}`
        const t0 = performance.now()
        const map = JSON.parse(
          (await run('nbdinfo', ['--map=qemu:allocation-depth', '--json', uri], { maxBuffer: 64 << 20 }))
            .stdout,
        ) as Array<{ offset: number; length: number; type: number }>
        const nbdinfoMs = performance.now() - t0
        const theirs = extentsToChunks(
          map.map((e) => ({ offset: e.offset, length: e.length, flags: e.type })),
          tracker.chunkSize,
          (f) => f === 1,
        )
        assert.deepEqual(written, theirs)
        assert.ok(written.length > 64, `the overlay holds ${written.length} chunks`)
        // The bytes of every written chunk, read by us and by nbdcopy.
        const copy = join(diskDir, 'copy.raw')
        await run('nbdcopy', [uri, copy])
        const fd = openSync(copy, 'r')
        try {
          const theirsChunk = Buffer.alloc(tracker.chunkSize)
          for (const i of written) {
            const ours = await tracker.read(i)
            readSync(fd, theirsChunk, 0, tracker.chunkSize, i * tracker.chunkSize)
            assert.ok(ours.equals(theirsChunk), `chunk ${i} differs`)
          }
        } finally {
          closeSync(fd)
        }
        rmSync(copy)
        process.stdout.write(
          `      overlay: ${written.length} chunks (${((written.length * tracker.chunkSize) / 2 ** 20).toFixed(1)} MiB); nbdinfo --map took ${nbdinfoMs.toFixed(0)} ms\n`,
        )
      } finally {
        await vm!.resume()
      }
    } finally {
      blk.close()
      await tracker.close()
    }
    // Closed: QEMU holds no bitmap or export of ours any more.
    const blockInfo = (await (vm as unknown as { qmpExecute: (c: string) => Promise<unknown> }).qmpExecute(
      'query-block',
    )) as Array<{ inserted?: { 'dirty-bitmaps'?: unknown[] } }>
    assert.deepEqual(
      blockInfo.flatMap((b) => b.inserted?.['dirty-bitmaps'] ?? []),
      [],
    )
  })

  it('a tracker opens over what an agent killed mid-move left in QEMU (NBD server, exports, bitmaps)', async () => {
    const qmp = (c: string, a?: Record<string, unknown>) =>
      (
        vm as unknown as { qmpExecute: (c: string, a?: Record<string, unknown>) => Promise<unknown> }
      ).qmpExecute(c, a)
    // A dead agent's tracker: server up, data export, a round's bitmap, never closed.
    const dead = vm!.diskTracker!()!
    await dead.open()
    await dead.start()
    const blk = await LineClient.connect(blkPort, 30_000)
    try {
      assert.match(await blk.command('dirty 1', 120_000), /^OK /)
      const tracker = vm!.diskTracker!()!
      try {
        await tracker.open()
        await tracker.start()
        assert.match(await blk.command('dirty 1', 120_000), /^OK /)
        const r = await tracker.collect()
        assert.ok(r.chunks.length >= 16, `the new tracker's round saw ${r.chunks.length} chunks`)
      } finally {
        await tracker.close()
      }
    } finally {
      blk.close()
    }
    const exports = (await qmp('query-block-exports')) as unknown[]
    const blockInfo = (await qmp('query-block')) as Array<{ inserted?: { 'dirty-bitmaps'?: unknown[] } }>
    assert.deepEqual(exports, [])
    assert.deepEqual(
      blockInfo.flatMap((b) => b.inserted?.['dirty-bitmaps'] ?? []),
      [],
    )
  })

  it('a tracker whose NBD server was stopped behind its back says who has it now (QEMU up, no exports)', async () => {
    const qmp = (c: string, a?: Record<string, unknown>) =>
      (
        vm as unknown as { qmpExecute: (c: string, a?: Record<string, unknown>) => Promise<unknown> }
      ).qmpExecute(c, a)
    const tracker = vm!.diskTracker!()!
    await tracker.open()
    try {
      await tracker.start()
      // What a second user of QEMU's one NBD server does (CI: a move's connection closed mid-move).
      await qmp('nbd-server-stop')
      await assert.rejects(tracker.read(0, 2), (err: Error) => {
        assert.equal(err.name, 'DiskTrackerError')
        assert.match(
          err.message,
          /^reading chunks 0\+2 of node '.+' failed \d+ ms after the tracker opened: NBD connection.*\(QEMU is running, its block exports: none\)$/,
        )
        return true
      })
    } finally {
      await tracker.close()
    }
  })

  it('stop() removes the disk', async () => {
    const path = vm!.volumePath!
    await vm!.stop()
    vm = undefined
    assert.equal(existsSync(path), false)
  })
})
