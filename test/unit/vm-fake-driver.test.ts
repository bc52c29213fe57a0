import assert from 'node:assert/strict'
import { createFakeDriver, FakeVm } from '../../vm/fake/driver.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { runDriverCompliance } from '../helpers/vm-compliance.ts'

let n = 0
runDriverCompliance('fake', async () => ({
  driver: createFakeDriver(),
  spec: () => validateVmSpec({ name: `fake-${process.pid}-${n++}`, memoryMiB: 32, kernel: '/boot/vmlinuz' }),
  kill: async (vm) => {
    assert.ok(vm instanceof FakeVm)
    await vm.crash(137, ['Killed'])
  },
  timeoutMs: 10_000,
}))

describe('fake driver extras', () => {
  it('guest uptime only advances while running and survives save/load', async () => {
    const driver = createFakeDriver()
    const spec = validateVmSpec({ name: `fake-up-${process.pid}`, memoryMiB: 16, kernel: '/k' })
    const src = (await driver.start(spec)) as FakeVm
    await new Promise((r) => setTimeout(r, 30)) // deliberate: wall time passes (the fake's uptime is the clock's)
    await src.pause()
    const at = src.uptimeMs()
    await new Promise((r) => setTimeout(r, 30)) // deliberate: time passes while paused, uptime must not
    assert.equal(src.uptimeMs(), at, 'paused guests do not age')
    const state = await src.saveState()
    const { copyFile } = await import('node:fs/promises')
    const copy = `${src.memory.path}.copy`
    await copyFile(src.memory.path, copy)
    const dst = (await driver.start(spec, { incoming: true, memoryPath: copy })) as FakeVm
    await dst.loadState(state)
    assert.equal(dst.uptimeMs(), at)
    await dst.resume()
    await src.stop()
    await dst.stop()
  })
})
