/**
 * The Debian/PostgreSQL guest fixture: built (debootstrap, cached by recipe hash), booted under QEMU
 * from a qcow2 overlay on its base image, ready within 60 s, with PostgreSQL answering a real client
 * (psql, pgbench) and the block and memory checkers working on its disk and RAM.
 */
import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { type BootedGuest, bootGuest } from '../../fixtures/guest/qemu.ts'
import {
  DEBIAN_CMDLINE,
  debianMirror,
  ensureDebianGuest,
  readDebianManifest,
} from '../../fixtures/guest-debian/build.ts'
import { pgBin, pgEnv } from '../../fixtures/guest-debian/client.ts'
import { BLKCHECK_PORT, PG_DATABASE, PG_PORT, PG_USER } from '../../fixtures/guest-debian/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { LineClient } from '../helpers/vm.ts'

const execP = promisify(execFile)
/** execFile that says what the program printed when it fails. */
async function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}) {
  try {
    return await execP(cmd, args, opts)
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string }
    throw new Error(`${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}`)
  }
}

describe('Debian/PostgreSQL guest fixture (debootstrap, QEMU)', function () {
  // A cold build runs debootstrap from the registry (~50–80 s); cached builds take milliseconds.
  this.timeout(600_000)
  let dir: string
  let g: BootedGuest | undefined

  before(function () {
    requireOrSkip(this, {
      root: true,
      commands: [
        'qemu-system-x86_64',
        'qemu-img',
        'debootstrap',
        'mkfs.ext4',
        'gcc',
        pgBin('psql'),
        pgBin('pgbench'),
      ],
    })
    dir = mkdtempSync(join(tmpdir(), 'mesh-debian-test-'))
  })

  after(async () => {
    await g?.kill()
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true })
  })

  it("finds the host's Debian mirror for bookworm", () => {
    assert.match(debianMirror(), /^https?:\/\/\S+$/)
    assert.equal(
      debianMirror({ MESH_DEBIAN_MIRROR: 'http://mirror.test/debian' }),
      'http://mirror.test/debian',
    )
  })

  it('boots from a qcow2 overlay, ready in ≤ 60 s, with PostgreSQL and both checkers working', async () => {
    const t0 = Date.now()
    const image = await ensureDebianGuest({ log: (s) => process.stdout.write(`      ${s}\n`) })
    const manifest = readDebianManifest(image)
    const buildMs = Date.now() - t0
    const overlay = join(dir, 'disk.qcow2')
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', image.disk, '-F', 'raw', overlay, '4G'])
    g = bootGuest({
      image,
      memMiB: 512,
      cmdline: DEBIAN_CMDLINE,
      disks: [overlay],
      netdev: {
        type: 'user',
        hostfwd: [{ guestPort: PG_PORT }, { guestPort: BLKCHECK_PORT }, { guestPort: MEMCHECK_PORT }],
      },
    })
    const ready = await g.waitReady({ timeoutMs: 120_000 })
    process.stdout.write(
      `      built/loaded in ${buildMs} ms (image ${manifest.diskUsedBytes} bytes allocated), ready in ${ready.bootMs} ms (${g.accel})\n`,
    )
    assert.ok(ready.bootMs <= 60_000, `ready after ${ready.bootMs} ms`)
    const fwd = await g.forwards()
    const pg = ['-h', '127.0.0.1', '-p', String(fwd.get(PG_PORT)), '-U', PG_USER]
    const env = pgEnv()
    const v = await run(pgBin('psql'), [...pg, '-d', PG_DATABASE, '-tAc', 'show server_version'], { env })
    assert.match(v.stdout, /^15\./)
    await run(pgBin('pgbench'), [...pg, '-i', '-s', '1', '-q', PG_DATABASE], { env })
    const bench = await run(pgBin('pgbench'), [...pg, '-T', '5', '-c', '2', PG_DATABASE], { env })
    assert.match(bench.stdout, /number of failed transactions: 0 /)
    const amcheck = await run(pgBin('pg_amcheck'), [...pg, '-d', PG_DATABASE, '--heapallindexed'], { env })
    assert.equal(amcheck.stdout.trim(), '')

    const blk = await LineClient.connect(fwd.get(BLKCHECK_PORT)!, 30_000)
    try {
      assert.match(await blk.command('fill 8', 60_000), /^OK blocks=2048 /)
      assert.match(await blk.command('dirty 2', 60_000), /^OK dirtied=512 /)
      assert.match(await blk.command('check', 60_000), /^OK blocks=2048 /)
      // The checker must catch a disk that lags the guest's memory.
      assert.match(await blk.command('stale 7'), /^OK stale block=7 /)
      assert.match(await blk.command('check', 60_000), /^BAD block=7 word=1 /)
    } finally {
      blk.close()
    }
    const mem = await LineClient.connect(fwd.get(MEMCHECK_PORT)!, 30_000)
    try {
      assert.match(await mem.command('fill 8', 60_000), /^OK /)
      assert.match(await mem.command('check', 60_000), /^OK /)
    } finally {
      mem.close()
    }
  })
})
