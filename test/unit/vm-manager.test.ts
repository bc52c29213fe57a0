import assert from 'node:assert/strict'
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createFakeDriver, FakeVm } from '../../vm/fake/driver.ts'
import { VmManager } from '../../vm/manager.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { waitUntil } from '../helpers/wait.ts'

describe('VmManager (fake driver)', () => {
  let dir: string
  const driver = createFakeDriver()
  const managers: VmManager[] = []

  function manager(): VmManager {
    const m = new VmManager({ driver, dir })
    managers.push(m)
    return m
  }
  const spec = (name: string) => validateVmSpec({ name, memoryMiB: 16, kernel: '/k' })

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vm-manager-'))
  })
  afterEach(async () => {
    for (const m of managers.splice(0)) {
      for (const v of await m.list()) await m.stop(v.name).catch(() => {})
    }
    await rm(dir, { recursive: true, force: true })
  })

  it('runs VMs, persists records, refuses duplicates, stops and forgets them', async () => {
    const m = manager()
    await m.init()
    const info = await m.run(spec('a'))
    assert.equal(info.status, 'running')
    assert.equal(info.memoryMiB, 16)
    await assert.rejects(m.run(spec('a')), { name: 'VmStateError' })
    const rec = JSON.parse(await readFile(join(dir, 'a.json'), 'utf8'))
    assert.equal(rec.name, 'a')
    assert.equal(rec.handle.pid, info.pid)
    const stopped = await m.stop('a')
    assert.equal(stopped.status, 'stopped')
    assert.deepEqual(await m.list(), [])
    assert.deepEqual(await readdir(dir), [])
    await assert.rejects(m.stop('a'), { name: 'VmNotFoundError' })
    await assert.rejects(m.console('nope'), { name: 'VmNotFoundError' })
  })

  it('a restarted manager re-adopts running VMs', async () => {
    const m1 = manager()
    await m1.init()
    await m1.run(spec('b'))
    await m1.close()
    const m2 = manager()
    const started: string[] = []
    m2.on('started', ({ name }) => started.push(name))
    await m2.init()
    // The tunnel plugs re-adopted guests back in on this event.
    assert.deepEqual(started, ['b'])
    const [b] = await m2.list()
    assert.equal(b?.name, 'b')
    assert.equal(b?.status, 'running')
    await m2.get('b').pause()
    assert.equal((await m2.list())[0]?.status, 'paused')
  })

  it('reports a VM that dies with exit status and last console lines, also to the next manager', async () => {
    const m = manager()
    await m.init()
    await m.run(spec('c'))
    const exited = new Promise<{ name: string; exit: { code: number | null; lastLines: string[] } }>((r) =>
      m.once('exited', r),
    )
    const vm = m.get('c')
    assert.ok(vm instanceof FakeVm)
    await vm.crash(139, ['kernel panic: boom'])
    const e = await exited
    assert.equal(e.name, 'c')
    assert.equal(e.exit.code, 139)
    assert.ok(e.exit.lastLines.includes('kernel panic: boom'))
    // The record is written after the event (durably, by rename): wait for it, not for a while.
    await waitUntil('the exit in c.json', async () => {
      const rec = JSON.parse(await readFile(join(dir, 'c.json'), 'utf8')) as { exit?: { code?: number } }
      return rec.exit?.code === 139
    })
    const m2 = manager()
    await m2.init()
    const [c] = await m2.list()
    assert.equal(c?.status, 'exited')
    assert.equal(c?.exit?.code, 139)
    assert.deepEqual((await m2.console('c')).slice(-1), ['kernel panic: boom'])
    assert.throws(() => m2.get('c'), { name: 'VmStateError' })
    await m2.stop('c') // clears the record
    assert.deepEqual(await readdir(dir), [])
  })

  it('a VM that died while nobody watched is reported as exited and its files removed', async () => {
    const ram = join(dir, 'lost.ram')
    const logdir = join(dir, 'lost.run')
    await writeFile(ram, 'x')
    await (await import('node:fs/promises')).mkdir(logdir)
    await writeFile(join(logdir, 'console.log'), 'booting\nOops: general protection fault\n')
    await writeFile(
      join(dir, 'lost.json'),
      JSON.stringify({
        version: 1,
        name: 'lost',
        startedAt: new Date().toISOString(),
        handle: {
          spec: spec('lost'),
          pid: 2 ** 22 + 12345,
          memoryPath: ram,
          paths: { dir: logdir, console: join(logdir, 'console.log') },
        },
      }),
    )
    await writeFile(join(dir, 'torn.json'), '{"version": 1, "na')
    const m = manager()
    const events: string[] = []
    m.on('exited', (e) => events.push(`${e.name}:${e.exit.lastLines.at(-1)}`))
    await m.init()
    assert.deepEqual(events, ['lost:Oops: general protection fault'])
    const [lost] = await m.list()
    assert.equal(lost?.status, 'exited')
    await assert.rejects(stat(ram), { code: 'ENOENT' })
    await assert.rejects(stat(logdir), { code: 'ENOENT' })
  })
})
