import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import { createMigrationService } from '../../src/agent/services/migration.ts'
import { createLogger } from '../../src/base/log.ts'
import {
  parseBytes,
  previousDisksBudget,
  prunePreviousDisks,
  sweepIncomingDisks,
} from '../../vm/disk/housekeeping.ts'
import {
  previousSincePath,
  previousVolumePath,
  retainVolume,
  seedPreviousVolume,
} from '../../vm/disk/previous.ts'
import { checkBaseHere } from '../../vm/disk/volume.ts'
import { createFakeDriver } from '../../vm/fake/driver.ts'
import { createMemoryRamCache } from '../../vm/migration/cache.ts'
import { createDriverHost } from '../../vm/migration/host.ts'
import { overlayMigrationNetwork } from '../../vm/migration/overlay.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { waitUntil } from '../helpers/wait.ts'

const MiB = 1024 * 1024

describe('disk dir housekeeping (leftover incoming disks, previous disks budget, path bases)', () => {
  let dir: string
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'disk-hk-'))
  })
  afterEach(() => rmSync(dir, { recursive: true, force: true }))

  it('sweeps incoming disks nothing uses; keeps a VM’s own and one a live process has open', async () => {
    const orphan = join(dir, 'g1.in-0badc0de.qcow2')
    const ofVm = join(dir, 'g2.in-12345678.qcow2')
    const open = join(dir, 'g3.in-abcdef01.qcow2')
    const own = join(dir, 'g4.qcow2')
    const prev = join(dir, 'g5.prev.qcow2')
    const deadSock = join(dir, '.g5.prev-999999999.sock')
    for (const f of [orphan, ofVm, open, own, prev, deadSock]) writeFileSync(f, 'x')
    // A process with the disk on its command line, like a committed incoming QEMU the agent re-adopts.
    const holder = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 30000)', open], { stdio: 'ignore' })
    try {
      await waitUntil('the holder to show the disk on its command line', () =>
        readFileSync(`/proc/${holder.pid}/cmdline`, 'utf8').includes(open),
      )
      const { removed, kept } = await sweepIncomingDisks(dir, new Set([ofVm]))
      assert.deepEqual(removed, [deadSock])
      // g1 has no previous disk here: its leftover becomes one (see the next case).
      assert.deepEqual(kept, [orphan])
      assert.equal(existsSync(orphan), false)
      assert.equal(existsSync(previousVolumePath(dir, 'g1')), true)
      for (const f of [ofVm, open, own, prev]) assert.equal(existsSync(f), true, `${f} kept`)
    } finally {
      holder.kill('SIGKILL')
    }
  })

  it('a leftover incoming disk becomes its VM’s previous disk (record-less) only if it has none and runs elsewhere', async () => {
    // An agent killed during a seeded return: its incoming disk holds the disk the VM left here.
    const older = join(dir, 'g1.in-00000001.qcow2')
    const newer = join(dir, 'g1.in-00000002.qcow2')
    writeFileSync(older, 'old')
    writeFileSync(newer, 'seeded')
    utimesSync(older, new Date(Date.now() - 60_000), new Date(Date.now() - 60_000))
    writeFileSync(previousSincePath(dir, 'g1'), '{"sid":"s","size":6,"mtimeMs":0}') // stale: no disk
    // g2 has a previous disk already (with its record): the leftover goes, the kept disk stays as it was.
    const g2in = join(dir, 'g2.in-00000003.qcow2')
    writeFileSync(g2in, 'partial')
    writeFileSync(join(dir, 'g2.qcow2'), 'kept')
    await retainVolume(join(dir, 'g2.qcow2'), dir, 'g2', 'sid2')
    const g2since = readFileSync(previousSincePath(dir, 'g2'), 'utf8')
    // g3 runs here (its own disk is in use): nothing to keep for a move back.
    const g3in = join(dir, 'g3.in-00000004.qcow2')
    writeFileSync(g3in, 'partial')
    const g3own = join(dir, 'g3.qcow2')
    writeFileSync(g3own, 'live')
    const { removed, kept } = await sweepIncomingDisks(dir, new Set([g3own]))
    assert.deepEqual(kept, [newer])
    assert.deepEqual(removed.sort(), [older, g2in, g3in].sort())
    assert.equal(readFileSync(previousVolumePath(dir, 'g1'), 'utf8'), 'seeded')
    assert.equal(existsSync(previousSincePath(dir, 'g1')), false, 'no record: it can never seed a move')
    assert.equal(await seedPreviousVolume(dir, 'g1', 's', join(dir, 'g1.in-00000005.qcow2')), false)
    assert.equal(readFileSync(previousVolumePath(dir, 'g2'), 'utf8'), 'kept')
    assert.equal(readFileSync(previousSincePath(dir, 'g2'), 'utf8'), g2since)
    assert.equal(existsSync(previousVolumePath(dir, 'g3')), false)
    assert.equal(readFileSync(g3own, 'utf8'), 'live')
  })

  it('holds previous disks to their budget, oldest first', async () => {
    const now = Date.now() / 1000
    const files = ['a', 'b', 'c'].map((n, i) => {
      const p = join(dir, `${n}.prev.qcow2`)
      writeFileSync(p, Buffer.alloc(MiB, 1))
      utimesSync(p, now - 300 + i * 100, now - 300 + i * 100) // a oldest, c newest
      return p
    })
    writeFileSync(join(dir, 'live.qcow2'), Buffer.alloc(4 * MiB, 1)) // not a previous disk: never counted
    assert.deepEqual(await prunePreviousDisks(dir, 3 * MiB), [])
    const pruned = await prunePreviousDisks(dir, 2 * MiB)
    assert.deepEqual(
      pruned.map((d) => d.path),
      [files[0]],
    )
    assert.deepEqual(
      (await prunePreviousDisks(dir, 0)).map((d) => d.path),
      [files[1], files[2]],
    )
    assert.equal(existsSync(join(dir, 'live.qcow2')), true)
  })

  it('a kept disk seeds the incoming disk only for the move it ended, unchanged; never a stale record', async () => {
    const sid = '0123456789abcdef'
    const live = join(dir, 'g.qcow2')
    writeFileSync(live, 'disk at the end of the move')
    await retainVolume(live, dir, 'g', sid)
    const kept = previousVolumePath(dir, 'g')
    const record = previousSincePath(dir, 'g')
    assert.equal(existsSync(kept), true)
    assert.equal(existsSync(record), true)
    const dest = join(dir, 'g.in-00000001.qcow2')
    assert.equal(await seedPreviousVolume(dir, 'g', 'fedcba9876543210', dest), false, 'another move')
    // Changed after it was kept (size): not the disk the record describes.
    writeFileSync(kept, 'disk at the end of the move, then written')
    assert.equal(await seedPreviousVolume(dir, 'g', sid, dest), false, 'changed file')
    assert.equal(existsSync(dest), false)
    // Kept again without a move named: the old record goes, so it cannot name the new file.
    writeFileSync(live, 'x')
    await retainVolume(live, dir, 'g')
    assert.equal(existsSync(record), false)
    assert.equal(await seedPreviousVolume(dir, 'g', sid, dest), false, 'no record')
    // The real thing: moved in (not copied), the record gone with it.
    writeFileSync(live, 'y')
    await retainVolume(live, dir, 'g', sid)
    assert.equal(await seedPreviousVolume(dir, 'g', sid, dest), true)
    assert.equal(readFileSync(dest, 'utf8'), 'y')
    assert.equal(existsSync(kept), false)
    assert.equal(existsSync(record), false)
    // Pruning a kept disk takes its record too.
    writeFileSync(live, 'z')
    await retainVolume(live, dir, 'g', sid)
    await prunePreviousDisks(dir, 0)
    assert.equal(existsSync(kept), false)
    assert.equal(existsSync(record), false)
  })

  it('budget: MESH_PREV_DISKS_MAX, else a quarter of the file system', async () => {
    assert.equal(parseBytes('512M'), 512 * MiB)
    assert.equal(parseBytes('20G'), 20 * 1024 * MiB)
    assert.equal(parseBytes('0'), 0)
    assert.equal(parseBytes('1.5KiB'), 1536)
    assert.throws(() => parseBytes('lots'), { name: 'VolumeError' })
    assert.equal(await previousDisksBudget(dir, { MESH_PREV_DISKS_MAX: '1G' }), 1024 * MiB)
    const fs = await previousDisksBudget(dir, {})
    assert.ok(fs > 0 && Number.isFinite(fs))
  })

  it('a base given as a path must be on the destination; an image name need not be', async () => {
    await checkBaseHere({ base: 'image:debian-pg:1' })
    const base = join(dir, 'base.raw')
    writeFileSync(base, '')
    await checkBaseHere({ base })
    await assert.rejects(checkBaseHere({ base: join(dir, 'nowhere.raw') }), (e: Error) => {
      assert.equal(e.name, 'VolumeError')
      assert.match(e.message, /not on this host.*same path on every host.*image/)
      return true
    })
  })

  it('a move whose path base is missing on the destination fails at once, saying so; the VM stays', async () => {
    const net = createMemoryNetwork()
    const log = createLogger({ sink: () => {} })
    const hosts = ['A', 'B'].map((id) => {
      const driver = createFakeDriver({ ramDir: dir })
      const host = createDriverHost({ driver, ramDir: join(dir, id) })
      const service = createMigrationService({
        network: overlayMigrationNetwork(net.node(id)),
        host,
        cache: createMemoryRamCache(),
        log,
        isMember: (p) => p === 'A' || p === 'B',
        tuning: { timeoutMs: 3000, rememberDelayMs: 0 },
      })
      return { driver, host, service }
    })
    net.connect('A', 'B')
    const [a, b] = hosts as [(typeof hosts)[0], (typeof hosts)[0]]
    try {
      for (const h of hosts) await h.service.start(new AbortController().signal)
      const spec = validateVmSpec({
        name: 'g1',
        memoryMiB: 16,
        kernel: '/fake/vmlinuz',
        disk: { base: join(dir, 'only-on-a.raw') },
      })
      a.host.add(await a.driver.start(spec))
      const err = await a.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
      assert.ok(err instanceof Error)
      assert.match(err.message, /is not on this host/)
      assert.equal(a.host.get('g1')?.status(), 'running')
      assert.equal(b.host.get('g1'), undefined)
    } finally {
      for (const h of hosts) {
        await h.service.stop()
        await h.host.stopAll()
      }
    }
  })
})
