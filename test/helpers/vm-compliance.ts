import assert from 'node:assert/strict'
import { copyFile, open, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Vm, VmDriver, VmEvents } from '../../vm/driver/interfaces.ts'
import type { VmSpec } from '../../vm/spec.ts'

/** What the compliance suite needs from a driver under test. */
export interface ComplianceHarness {
  driver: VmDriver
  /** A spec that starts on this driver (each call a fresh name). */
  spec(): VmSpec
  /** Kills the VM's hypervisor behind the driver's back (a crash). */
  kill(vm: Vm): Promise<void>
  /** Per-test timeout, ms (QEMU under TCG on a busy box needs minutes). */
  timeoutMs: number
  cleanup?(): Promise<void>
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  )
}

function nextEvent<K extends keyof VmEvents>(vm: Vm, event: K, ms = 30_000): Promise<VmEvents[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no '${event}' event in ${ms} ms`)), ms)
    vm.once(event, (e) => {
      clearTimeout(timer)
      resolve(e)
    })
  })
}

async function readAt(path: string, offset: number, len: number): Promise<Buffer> {
  const fh = await open(path, 'r')
  try {
    const buf = Buffer.alloc(len)
    await fh.read(buf, 0, len, offset)
    return buf
  } finally {
    await fh.close()
  }
}

async function writeAt(path: string, offset: number, data: Buffer): Promise<void> {
  const fh = await open(path, 'r+')
  try {
    await fh.write(data, 0, data.length, offset)
  } finally {
    await fh.close()
  }
}

/**
 * The contract every VmDriver must keep; run against the fake (unit) and QEMU (system). `make` runs in
 * a `before` hook with the mocha context, so it may skip the suite (requireOrSkip).
 */
export function runDriverCompliance(
  name: string,
  make: (ctx: Mocha.Context) => Promise<ComplianceHarness>,
): void {
  describe(`VmDriver compliance: ${name}`, () => {
    let h: ComplianceHarness
    const vms: Vm[] = []
    const files: string[] = []

    before(async function () {
      this.timeout(15 * 60_000)
      h = await make(this)
    })
    beforeEach(function () {
      if (h !== undefined) this.timeout(h.timeoutMs)
    })
    afterEach(async function () {
      this.timeout(120_000)
      for (const vm of vms.splice(0)) await vm.stop().catch(() => {})
      for (const f of files.splice(0)) await rm(f, { force: true })
    })
    after(async () => {
      await h?.cleanup?.()
    })

    async function start(spec = h.spec(), opts: Parameters<VmDriver['start']>[1] = {}): Promise<Vm> {
      const vm = await h.driver.start(spec, opts)
      vms.push(vm)
      return vm
    }

    it('starts a VM whose RAM is a file of the spec size', async () => {
      const spec = h.spec()
      const vm = await start(spec)
      assert.equal(vm.status(), 'running')
      assert.equal(vm.memory.size, spec.memoryMiB * 1024 * 1024)
      assert.equal((await stat(vm.memory.path)).size, vm.memory.size)
      assert.equal(vm.spec.name, spec.name)
      if (vm.netSocket !== undefined) {
        assert.ok((await stat(vm.netSocket)).isSocket(), 'the NIC stream socket listens')
      }
    })

    it('pauses and resumes with events; both idempotent', async () => {
      const vm = await start()
      const paused = nextEvent(vm, 'paused')
      await vm.pause()
      await paused
      assert.equal(vm.status(), 'paused')
      await vm.pause()
      const resumed = nextEvent(vm, 'resumed')
      await vm.resume()
      await resumed
      assert.equal(vm.status(), 'running')
      await vm.resume()
      assert.equal(vm.status(), 'running')
    })

    it('can start paused and boot on resume', async () => {
      const vm = await start(h.spec(), { paused: true })
      assert.equal(vm.status(), 'paused')
      await vm.resume()
      assert.equal(vm.status(), 'running')
    })

    it('stop ends the VM, removes its RAM file, and later calls fail with VmStateError', async () => {
      const vm = await start()
      const stopped = nextEvent(vm, 'stopped')
      await vm.stop()
      await stopped
      assert.equal(vm.status(), 'stopped')
      assert.equal(await exists(vm.memory.path), false, 'RAM file left behind')
      await vm.stop() // idempotent
      await assert.rejects(vm.resume(), { name: 'VmStateError' })
      await assert.rejects(vm.saveState(), { name: 'VmStateError' })
      const exit = await vm.wait()
      assert.ok(Array.isArray(exit.lastLines))
    })

    it('dirty tracker reports exactly the chunks written since the last round', async () => {
      const vm = await start()
      await vm.pause() // a paused guest writes nothing of its own
      // compare: these writes come from this process, not the guest (soft-dirty sees only the guest's)
      const t = vm.dirtyTracker({ chunkSize: 64 * 1024, method: 'compare' })
      await t.start()
      const offset = 3 * 1024 * 1024 + 4096 // not chunk aligned: touches 17 chunks
      const len = 1024 * 1024
      const original = await readAt(vm.memory.path, offset, len)
      try {
        await writeAt(vm.memory.path, offset, Buffer.alloc(len, 0xa5))
        const r1 = await t.collect()
        const want = Array.from({ length: 17 }, (_, i) => 48 + i)
        assert.deepEqual(r1.chunks, want)
        assert.equal(r1.dirtyBytes, 17 * 64 * 1024)
        assert.ok(r1.rateBytesPerSec > 0)
        const r2 = await t.collect()
        assert.deepEqual(r2.chunks, [], 'nothing written since the last round')
        assert.equal(r2.dirtyBytes, 0)
      } finally {
        await writeAt(vm.memory.path, offset, original) // give the guest its memory back
      }
      const r3 = await t.collect()
      assert.equal(r3.chunks.length, 17, 'restoring the bytes is a change since the last round')
      await t.close()
      await vm.resume()
    })

    it('saves device state, loads it into a second VM with a copy of the RAM, and resumes there', async () => {
      const spec = h.spec()
      const src = await start(spec)
      const state = await src.saveState()
      assert.ok(state.length > 0, 'empty device state')
      assert.equal(src.status(), 'paused')
      const copy = join(tmpdir(), `vm-compliance-${process.pid}-${Date.now()}.ram`)
      files.push(copy)
      await copyFile(src.memory.path, copy)
      const dst = await start(spec, { incoming: true, memoryPath: copy })
      assert.equal(dst.status(), 'incoming')
      assert.equal(dst.memory.path, copy)
      await assert.rejects(dst.resume(), { name: 'VmStateError' })
      await dst.loadState(state)
      assert.equal(dst.status(), 'paused')
      await dst.resume()
      assert.equal(dst.status(), 'running')
      await src.stop()
      await dst.stop()
      assert.equal(await exists(copy), false, 'the destination owns and removes its RAM file')
    })

    it('snapshotState: the guest keeps running without pause events, and a later saveState differs little', async () => {
      const vm = await start()
      if (vm.snapshotState === undefined) {
        process.stdout.write('      (this driver has no snapshotState: nothing to check)\n')
        return
      }
      const events: string[] = []
      const onPaused = () => events.push('paused')
      const onResumed = () => events.push('resumed')
      vm.on('paused', onPaused)
      vm.on('resumed', onResumed)
      try {
        const snap = await vm.snapshotState()
        assert.ok(snap.length > 0, 'empty snapshot')
        assert.equal(vm.status(), 'running')
        assert.deepEqual(events, [], 'a snapshot is not a pause to the VM users')
        // Twice in a row works (a migration may take it again after a rolled-back attempt).
        await vm.snapshotState()
        assert.equal(vm.status(), 'running')
        const state = await vm.saveState()
        assert.deepEqual(events, ['paused'])
        assert.ok(
          Math.abs(state.length - snap.length) <= snap.length / 10,
          `${state.length} vs ${snap.length} bytes`,
        )
      } finally {
        vm.off('paused', onPaused)
        vm.off('resumed', onResumed)
      }
      await vm.pause()
      await assert.rejects(vm.snapshotState(), { name: 'VmStateError' })
      await vm.resume()
      assert.equal(vm.status(), 'running')
    })

    it('rolls back: after saveState the source can resume', async () => {
      const vm = await start()
      await vm.saveState()
      await vm.resume()
      assert.equal(vm.status(), 'running')
      await vm.pause()
      assert.equal(vm.status(), 'paused')
    })

    it('loadState of garbage fails with VmMigrationError and leaves no running VM', async () => {
      const spec = h.spec()
      const copy = join(tmpdir(), `vm-compliance-${process.pid}-${Date.now()}-bad.ram`)
      files.push(copy)
      const fh = await open(copy, 'w')
      await fh.truncate(spec.memoryMiB * 1024 * 1024)
      await fh.close()
      const dst = await start(spec, { incoming: true, memoryPath: copy })
      await assert.rejects(dst.loadState(Buffer.from('this is not a device state')), {
        name: 'VmMigrationError',
      })
      assert.notEqual(dst.status(), 'running')
      await dst.stop()
    })

    it('loadState on a VM that is not incoming fails with VmStateError', async () => {
      const vm = await start()
      await assert.rejects(vm.loadState(Buffer.from('{}')), { name: 'VmStateError' })
    })

    it('reports a hypervisor crash as an exited event with its status, and cleans up', async () => {
      const vm = await start()
      const exited = nextEvent(vm, 'exited')
      await h.kill(vm)
      const e = await exited
      assert.ok(e.code !== 0 || e.signal !== null, `exit status ${e.code}/${e.signal}`)
      assert.equal(vm.status(), 'exited')
      assert.equal(await exists(vm.memory.path), false)
      await assert.rejects(vm.pause(), { name: 'VmExitedError' })
      await vm.stop() // still fine
    })

    it('re-adopts a detached VM from its handle', async () => {
      const vm = await start()
      const handle = h.driver.handle(vm)
      const json = JSON.parse(JSON.stringify(handle)) as typeof handle
      await vm.detach()
      const again = await h.driver.adopt(json)
      vms.push(again)
      assert.equal(again.status(), 'running')
      assert.equal(again.memory.path, vm.memory.path)
      await again.pause()
      assert.equal(again.status(), 'paused')
      await again.stop()
      assert.equal(await exists(again.memory.path), false)
      await assert.rejects(h.driver.adopt(json), { name: 'VmStateError' })
    })

    it('refuses unresolved image names and missing kernels with named errors', async () => {
      const spec = h.spec()
      await assert.rejects(h.driver.start({ ...spec, kernel: 'image:guest-kernel:1' }), (err: Error) => {
        assert.equal(err.name, 'VmSpecError')
        assert.match(err.message, /^spec\.kernel: /)
        return true
      })
      await assert.rejects(
        h.driver.start({ ...spec, kernel: '/nonexistent/does-not-exist/vmlinuz' }),
        (err: Error) => {
          assert.equal(err.name, 'VmStartError')
          assert.match(err.message, /spec\.kernel/)
          return true
        },
      )
    })

    it('refuses a memory file of the wrong size', async () => {
      const spec = h.spec()
      const copy = join(tmpdir(), `vm-compliance-${process.pid}-${Date.now()}-small.ram`)
      files.push(copy)
      const fh = await open(copy, 'w')
      await fh.truncate(1024 * 1024)
      await fh.close()
      await assert.rejects(h.driver.start(spec, { incoming: true, memoryPath: copy }), {
        name: 'VmStartError',
      })
    })
  })
}
