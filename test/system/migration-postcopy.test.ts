/**
 * Post-copy through the migration service with real QEMU guests (two hosts in one process, memory
 * link): the guest's memory checker rewrites its memory; the move resumes it on B before the chunks it
 * dirtied arrive (mesh-uffd pages them in), and the memory checker must find every byte. Then back,
 * with a deadline (auto mode), which must carry an estimate.
 */
import assert from 'node:assert/strict'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { createLogger } from '../../src/base/log.ts'
import { createTwoHosts, type TestHost, type TwoHosts } from '../bench/_migrate-hosts.ts'
import { LineClient } from '../helpers/vm.ts'

const MiB = 1024 * 1024

async function memcheck(on: TestHost, cmd: string): Promise<string> {
  const c = await LineClient.connect(on.memPort, 60_000)
  try {
    return await c.command(cmd, 120_000)
  } catch (err) {
    const vm = on.host.get('pc-g')
    const tail = vm === undefined ? ['(no VM here)'] : await vm.consoleTail(15)
    throw new Error(
      `memcheck '${cmd}' on ${on.id} (VM ${vm?.status() ?? 'absent'}): ${String(err)}\n${tail.join('\n')}`,
    )
  } finally {
    c.close()
  }
}

describe('post-copy migration with real QEMU guests (two hosts in one process, memory link)', function () {
  this.timeout(900_000)
  let hosts: TwoHosts | undefined

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['qemu-system-x86_64', 'gcc'] })
    hosts = await createTwoHosts({ tag: 'mpc', log: createLogger({ level: 'error' }) })
  })

  after(async () => {
    if (hosts === undefined) return
    const left = await hosts.destroy()
    assert.deepEqual(left, [], 'files left behind')
  })

  it('moves a busy guest in post-copy: short pause, faults served, memory intact; back with a deadline', async () => {
    const { a, b } = hosts!
    await hosts!.boot(a, hosts!.spec('pc-g', 256))
    assert.match(await memcheck(a, 'fill 128'), /^OK pages=32768 /)
    assert.match(await memcheck(a, 'churn 32'), /^OK churn=32/)
    const events: string[] = []
    const there = await a.service.migrate(
      { vm: 'pc-g', to: 'B', mode: 'postcopy', maxPauseMs: 1000 },
      { onProgress: (p) => events.push(p.phase) },
    )
    await a.service.settled()
    process.stdout.write(
      `      A→B post-copy: total ${Math.round(there.totalMs)} ms, paused ${Math.round(there.downtimeMs)} ms, owed ${((there.postcopy?.owedBytes ?? 0) / MiB).toFixed(1)} MiB placed in ${there.postcopy?.ms} ms, ${there.postcopy?.faults} faults (longest ${there.postcopy?.maxFaultWaitMs} ms)\n`,
    )
    assert.equal(there.mode, 'postcopy')
    assert.ok(there.postcopy !== undefined && there.postcopy.owedBytes > 0, 'something was owed')
    assert.ok(there.downtimeMs < 1000, `paused ${there.downtimeMs} ms`)
    assert.ok(events.includes('postcopy'), `phases: ${[...new Set(events)].join(',')}`)
    assert.equal(b.host.get('pc-g')?.status(), 'running')
    assert.equal(a.host.get('pc-g'), undefined, 'A let go of its copy after the last chunk')
    const c1 = await memcheck(b, 'check')
    assert.match(c1, /^OK pages=32768 /, `memory checker after the post-copy move: ${c1}`)

    // The deadline's verdict is judged on the rates measured in this run. A starved box (nice'd full run
    // at load 30: link 0.3 MB/s, guest 10.8 MB/s, where 50–100 MB/s is usual) can rightly call 60 s
    // infeasible; the refusal leaves the VM running on B untouched, so it is tried once more. A verdict
    // that is wrong on a box of normal speed fails both tries.
    let back: Awaited<ReturnType<typeof b.service.migrate>> | undefined
    for (let attempt = 1; back === undefined; attempt++) {
      try {
        back = await b.service.migrate({ vm: 'pc-g', to: 'A', deadlineMs: 60_000 })
      } catch (err) {
        if (attempt === 2 || !(err instanceof Error) || err.name !== 'MigrationInfeasibleError') throw err
        process.stdout.write(`      B→A try ${attempt} refused: ${err.message}\n`)
        await b.service.settled()
        assert.equal(b.host.get('pc-g')?.status(), 'running', 'a refused move leaves the VM running')
        assert.equal(a.host.get('pc-g'), undefined)
      }
    }
    await b.service.settled()
    assert.ok(back.estimate !== undefined, 'a deadline move carries its estimate')
    // (Over the in-memory link the move may end before the rates are measured well enough to judge.)
    assert.notEqual(back.estimate.feasible, false)
    assert.ok(back.totalMs < 60_000)
    assert.equal(back.maxPauseMs, 1000)
    assert.ok(back.downtimeMs < 1000, `paused ${back.downtimeMs} ms`)
    const c2 = await memcheck(a, 'check')
    assert.match(c2, /^OK pages=32768 /, c2)
    process.stdout.write(
      `      B→A deadline 60 s: ${back.mode}, total ${Math.round(back.totalMs)} ms, paused ${Math.round(back.downtimeMs)} ms; estimate link ${(back.estimate.linkBytesPerSec / 1e6).toFixed(0)} MB/s dirty ${(back.estimate.dirtyBytesPerSec / 1e6).toFixed(1)} MB/s\n`,
    )
    await memcheck(a, 'churn 0')
  })
})
