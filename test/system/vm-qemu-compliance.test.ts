import assert from 'node:assert/strict'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import type { Vm } from '../../vm/driver/interfaces.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { cleanupVmDirs, vmTestDirs } from '../helpers/vm.ts'
import { runDriverCompliance } from '../helpers/vm-compliance.ts'

let n = 0
runDriverCompliance('qemu', async (ctx) => {
  requireOrSkip(ctx, { commands: ['qemu-system-x86_64'] })
  const guest = await ensureGuest()
  const dirs = vmTestDirs('cmp')
  return {
    driver: createQemuDriver({ ...dirs, startTimeoutMs: 120_000, commandTimeoutMs: 120_000 }),
    spec: () =>
      validateVmSpec({
        name: `cmp${n++}`,
        memoryMiB: 128,
        vcpus: 1,
        kernel: guest.kernel,
        initrd: guest.initrd,
        ip: '10.0.2.15/24',
      }),
    kill: async (vm) => {
      assert.ok(vm.pid !== undefined)
      process.kill(vm.pid, 'SIGKILL')
    },
    timeoutMs: 240_000,
    cleanup: async () => {
      const left = await cleanupVmDirs(dirs)
      assert.deepEqual(left, [], 'files left behind by the driver')
    },
  }
})

describe('QEMU dirty tracker freeze (soft-dirty code path, forced)', function () {
  this.timeout(300_000)
  const dirs = vmTestDirs('frz')
  const vms: Vm[] = []
  let saved: string | undefined

  before(function () {
    requireOrSkip(this, { commands: ['qemu-system-x86_64'] })
    saved = process.env.MESH_DIRTY_METHOD
    process.env.MESH_DIRTY_METHOD = 'soft-dirty'
  })
  after(async () => {
    if (saved === undefined) delete process.env.MESH_DIRTY_METHOD
    else process.env.MESH_DIRTY_METHOD = saved
    for (const vm of vms) await vm.stop().catch(() => {})
    await cleanupVmDirs(dirs)
  })

  it('holds the guest still around each round without pause events, and a concurrent saveState wins', async () => {
    const guest = await ensureGuest()
    const driver = createQemuDriver({ ...dirs, startTimeoutMs: 120_000, commandTimeoutMs: 120_000 })
    const spec = validateVmSpec({ name: 'frz', memoryMiB: 64, kernel: guest.kernel, initrd: guest.initrd })
    const vm = await driver.start(spec)
    vms.push(vm)
    const events: string[] = []
    vm.on('paused', () => events.push('paused'))
    vm.on('resumed', () => events.push('resumed'))
    const t = vm.dirtyTracker()
    assert.equal(t.method, 'soft-dirty')
    await t.start()
    await t.collect()
    assert.equal(vm.status(), 'running')
    assert.deepEqual(events, [])
    // A round racing a saveState: the guest must end paused (the freeze must not `cont` it).
    const [state] = await Promise.all([vm.saveState(), t.collect()])
    assert.ok(state.length > 0)
    assert.equal(vm.status(), 'paused')
    assert.deepEqual(events, ['paused'])
    await new Promise((r) => setTimeout(r, 500))
    assert.equal(vm.status(), 'paused')
    await vm.resume()
    assert.deepEqual(events, ['paused', 'resumed'])
    await t.close()
  })
})
