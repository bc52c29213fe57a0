import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { copyFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { ensureGuest, type GuestImage } from '../../fixtures/guest/build.ts'
import { COUNTER_PORT, MEMCHECK_PORT, READY_RE } from '../../fixtures/guest/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import type { Vm, VmDriver } from '../../vm/driver/interfaces.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { type VmSpec, validateVmSpec } from '../../vm/spec.ts'
import { cleanupVmDirs, freePort, LineClient, vmTestDirs, waitConsole } from '../helpers/vm.ts'

const MiB = 1024 * 1024

function parseCounter(line: string): { seq: number; uptime: number } {
  const m = /^(\d+) (\d+)$/.exec(line)
  assert.ok(m, `not a counter line: '${line}'`)
  return { seq: Number(m[1]), uptime: Number(m[2]) }
}

function report(what: string, value: unknown): void {
  process.stdout.write(
    `      [measure] ${what}: ${typeof value === 'string' ? value : JSON.stringify(value)}\n`,
  )
}

describe('QEMU VM runtime with the test guest', function () {
  this.timeout(600_000)
  const dirs = vmTestDirs('gst')
  let guest: GuestImage
  let driver: VmDriver
  const vms: Vm[] = []
  const clients: LineClient[] = []
  const files: string[] = []

  before(async function () {
    requireOrSkip(this, { commands: ['qemu-system-x86_64'] })
    guest = await ensureGuest()
    driver = createQemuDriver({ ...dirs, startTimeoutMs: 120_000, commandTimeoutMs: 120_000 })
  })
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close()
    for (const vm of vms.splice(0)) await vm.stop().catch(() => {})
    for (const f of files.splice(0)) await rm(f, { force: true })
  })
  after(async () => {
    const left = await cleanupVmDirs(dirs)
    assert.deepEqual(left, [], 'files left behind')
  })

  function spec(name: string, memoryMiB = 256): VmSpec {
    return validateVmSpec({
      name,
      memoryMiB,
      vcpus: 1,
      kernel: guest.kernel,
      initrd: guest.initrd,
      ip: '10.0.2.15/24',
      cmdline: `quiet panic=-1 mesh.gw=10.0.2.2 mesh.name=${name}`,
    })
  }

  async function boot(s: VmSpec): Promise<{ vm: Vm; counterPort: number; memPort: number; bootMs: number }> {
    const counterPort = await freePort()
    const memPort = await freePort()
    const t0 = performance.now()
    const vm = await driver.start(s, {
      testNet: {
        hostfwd: [
          { hostPort: counterPort, guestPort: COUNTER_PORT },
          { hostPort: memPort, guestPort: MEMCHECK_PORT },
        ],
      },
    })
    vms.push(vm)
    const ready = await waitConsole(vm, READY_RE)
    const bootMs = Math.round(performance.now() - t0)
    assert.match(ready, new RegExp(`mac=${s.mac}`))
    return { vm, counterPort, memPort, bootMs }
  }

  it('boots, pauses, resumes and stops; the counter keeps counting across pause/resume', async () => {
    const { vm, counterPort, bootMs } = await boot(spec('g-life'))
    report('boot to MESH-GUEST-READY (256 MiB, TCG)', `${bootMs} ms`)
    const counter = await LineClient.connect(counterPort)
    clients.push(counter)
    const first = parseCounter(await counter.next(60_000))
    for (let i = 0; i < 5; i++) await counter.next()
    await vm.pause()
    await sleep(300) // lines in flight before the stop
    counter.drain()
    const before = parseCounter(counter.lastLine!)
    await sleep(1500)
    assert.equal(counter.drain(), undefined, 'a paused guest must not produce counter lines')
    await vm.resume()
    const after = parseCounter(await counter.next(60_000))
    assert.equal(after.seq, before.seq + 1, 'the same connection continues with the next sequence number')
    assert.ok(after.uptime >= before.uptime, 'uptime never goes back')
    assert.ok(before.seq > first.seq)
    await vm.stop()
    assert.equal(vm.status(), 'stopped')
    assert.equal(spawnSync('pgrep', ['-f', vm.memory.path]).status, 1, 'no QEMU left running')
  })

  it('saves device state, loads it into a second QEMU with a copy of the RAM: the guest continues', async () => {
    const s = spec('g-move')
    const { vm: src, counterPort, memPort } = await boot(s)
    const mem = await LineClient.connect(memPort)
    clients.push(mem)
    assert.match(await mem.command('fill 64'), /^OK pages=16384 /)
    assert.match(await mem.command('check'), /^OK /)
    mem.close()
    const counter = await LineClient.connect(counterPort)
    clients.push(counter)
    await counter.next(60_000)
    // The destination is started (and waits) before the switch, as migration does.
    const copy = join(dirs.ramDir, 'g-move-dest.ram')
    files.push(copy)
    await writeFile(copy, '')
    await (await import('node:fs/promises')).truncate(copy, s.memoryMiB * MiB)
    const dstCounter = await freePort()
    const dstMem = await freePort()
    const dst = await driver.start(s, {
      incoming: true,
      memoryPath: copy,
      testNet: {
        hostfwd: [
          { hostPort: dstCounter, guestPort: COUNTER_PORT },
          { hostPort: dstMem, guestPort: MEMCHECK_PORT },
        ],
      },
    })
    vms.push(dst)

    const tSwitch = performance.now()
    const state = await src.saveState()
    const tSaved = performance.now()
    counter.drain()
    const before = parseCounter(counter.lastLine!)
    await copyFile(src.memory.path, copy)
    const tCopied = performance.now()
    await dst.loadState(state)
    await dst.resume()
    const tRunning = performance.now()
    const wallPaused = tRunning - tSwitch
    report('device state size', `${state.length} bytes`)
    report('saveState (stop + migrate)', `${Math.round(tSaved - tSwitch)} ms`)
    report('RAM file copy (256 MiB)', `${Math.round(tCopied - tSaved)} ms`)
    report('loadState + cont', `${Math.round(tRunning - tCopied)} ms`)
    report(
      'switch-over (stop on source -> running on destination, with the RAM copy)',
      `${Math.round(wallPaused)} ms`,
    )
    assert.ok(state.length > 10_000 && state.length < 4 * MiB, `device state of ${state.length} bytes`)
    await src.stop()

    const c2 = await LineClient.connect(dstCounter)
    clients.push(c2)
    const after = parseCounter(await c2.next(60_000))
    assert.ok(after.uptime >= before.uptime, `uptime went back: ${before.uptime} -> ${after.uptime}`)
    const tAfter = performance.now()
    assert.ok(
      after.uptime - before.uptime < tAfter - tSwitch + 10_000,
      `uptime jumped: ${before.uptime} -> ${after.uptime} (the guest rebooted?)`,
    )
    const m2 = await LineClient.connect(dstMem)
    clients.push(m2)
    assert.match(await m2.command('check'), /^OK pages=16384 /, 'memory checker intact after the move')
    assert.equal(dst.status(), 'running')
  })

  it('dirty tracking: a guest writing 20 MiB shows >= 20 MiB dirty; an idle guest little', async () => {
    const { vm, memPort } = await boot(spec('g-dirty'))
    const mem = await LineClient.connect(memPort)
    clients.push(mem)
    assert.match(await mem.command('fill 48'), /^OK /)
    const t = vm.dirtyTracker()
    assert.equal(t.chunkSize, 64 * 1024)
    await t.start()
    await sleep(2000)
    const idle = await t.collect()
    report(
      `idle guest, ${t.method}, 2 s`,
      `${(idle.dirtyBytes / MiB).toFixed(2)} MiB dirty, scan ${Math.round(idle.scanMs)} ms`,
    )
    assert.ok(idle.dirtyBytes < 8 * MiB, `idle guest dirtied ${idle.dirtyBytes} bytes`)
    assert.match(await mem.command('dirty 20'), /^OK dirtied=5120 /)
    const busy = await t.collect()
    report(
      `guest dirtied 20 MiB, ${t.method}`,
      `${(busy.dirtyBytes / MiB).toFixed(2)} MiB in ${busy.chunks.length} chunks, rate ${(busy.rateBytesPerSec / MiB).toFixed(1)} MiB/s, scan ${Math.round(busy.scanMs)} ms`,
    )
    assert.ok(busy.dirtyBytes >= 20 * MiB, `only ${busy.dirtyBytes} bytes dirty`)
    const scans: number[] = []
    for (let i = 0; i < 5; i++) scans.push(Math.round((await t.collect()).scanMs))
    report('dirty-tracking round time, 256 MiB', `${scans.join(', ')} ms`)
    await t.close()
    assert.match(await mem.command('check'), /^OK /)
  })

  it('a QEMU that exits at start gives VmExitedError with its last lines, and leaves nothing behind', async () => {
    const bogus = join(tmpdir(), `not-a-kernel-${process.pid}`)
    files.push(bogus)
    await writeFile(bogus, 'this is not a kernel\n')
    const s = { ...spec('g-bad'), kernel: bogus }
    await assert.rejects(
      driver.start(s),
      (err: Error & { exit?: { lastLines: string[]; code: number | null } }) => {
        assert.equal(err.name, 'VmExitedError')
        assert.ok(err.exit !== undefined && err.exit.code !== 0)
        assert.ok(
          err.exit.lastLines.some((l) => /qemu/i.test(l)),
          err.exit.lastLines.join('\n'),
        )
        return true
      },
    )
    const missingQemu = createQemuDriver({ ...dirs, qemuBinary: '/nonexistent/qemu-system-x86_64' })
    await assert.rejects(missingQemu.start(spec('g-noqemu')), (err: Error) => {
      assert.equal(err.name, 'VmExitedError')
      assert.match(err.message, /ENOENT|cannot run QEMU/)
      return true
    })
    assert.equal(spawnSync('pgrep', ['-f', dirs.ramDir]).status, 1, 'no QEMU left running')
  })
})
