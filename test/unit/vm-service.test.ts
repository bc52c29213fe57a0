import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createLocalVmManager, createVmService, runDirFor } from '../../src/agent/services/vm.ts'
import { createLogger } from '../../src/base/log.ts'
import { createFakeDriver } from '../../vm/fake/driver.ts'

describe('VM agent service (fake driver)', () => {
  let dir: string
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vm-service-'))
  })
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true })
  })

  it('answers vm.run / vm.ls / vm.console / vm.stop and validates input', async () => {
    const manager = createLocalVmManager(dir, createFakeDriver())
    const logs: string[] = []
    const svc = createVmService({ manager, log: createLogger({ sink: (l) => logs.push(l) }) })
    const ac = new AbortController()
    await svc.start(ac.signal)
    const h = svc.handlers()
    const ctx = { emit: () => {}, signal: ac.signal }
    const info = await h['vm.run']({ spec: { name: 's1', memoryMiB: 16, kernel: '/k' } }, ctx)
    assert.equal(info.status, 'running')
    assert.deepEqual(svc.status?.(), { total: 1, running: 1 })
    await assert.rejects(h['vm.run']!({ spec: { name: 's2', memoryMiB: -1, kernel: '/k' } }, ctx), {
      name: 'VmSpecError',
      message: /^spec\.memoryMiB/,
    })
    const ls = await h['vm.ls']({}, ctx)
    assert.deepEqual(
      ls.vms.map((v) => v.name),
      ['s1'],
    )
    const con = await h['vm.console']({ name: 's1', lines: 5 }, ctx)
    assert.ok(con.lines.length > 0)
    await assert.rejects(h['vm.stop']!({}, ctx), { name: 'UsageError' })
    const st = await h['vm.stop']({ name: 's1' }, ctx)
    assert.equal(st.status, 'stopped')
    await svc.stop()
  })

  it('keeps the per-VM run dir short enough for unix socket paths', () => {
    assert.equal(runDirFor('/var/lib/mesh'), '/var/lib/mesh/run')
    const long = runDirFor(`/tmp/${'x'.repeat(100)}`)
    assert.ok(long.length < 60, long)
  })
})
