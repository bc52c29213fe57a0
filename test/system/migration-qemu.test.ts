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
    const vm = on.host.get('mig-g')
    const tail = vm === undefined ? ['(no VM here)'] : await vm.consoleTail(15)
    throw new Error(
      `memcheck '${cmd}' on ${on.id} (VM ${vm?.status() ?? 'absent'}): ${String(err)}\n${tail.join('\n')}`,
    )
  } finally {
    c.close()
  }
}

function field(line: string, key: string): number {
  const m = new RegExp(`${key}=(\\d+)`).exec(line)
  assert.ok(m, `no ${key}= in '${line}'`)
  return Number(m[1])
}

describe('migration with real QEMU guests (two hosts in one process, memory link)', function () {
  this.timeout(900_000)
  let hosts: TwoHosts | undefined

  before(async function () {
    requireOrSkip(this, { commands: ['qemu-system-x86_64'] })
    hosts = await createTwoHosts({ tag: 'migt', log: createLogger({ level: 'error' }) })
  })

  after(async () => {
    if (hosts === undefined) return
    const left = await hosts.destroy()
    assert.deepEqual(left, [], 'files left behind')
  })

  it('moves A→B→A with the memory checker filled and churning: intact, uptime continuous, cheap return', async () => {
    const { a, b } = hosts!
    const spec = hosts!.spec('mig-g', 256)
    await hosts!.boot(a, spec)
    assert.match(await memcheck(a, 'fill 64'), /^OK pages=16384 /)
    assert.match(await memcheck(a, 'churn 1 4'), /^OK churn=/)
    const s0 = await memcheck(a, 'stats')
    const t0 = performance.now()

    const there = await a.service.migrate({ vm: 'mig-g', to: 'B' })
    await a.service.settled()
    // A guest that dies after a move (QEMU exits with -no-reboot on a panic) says why on its console.
    b.host.get('mig-g')?.once('exited', (e) => {
      process.stdout.write(`      guest on B exited: ${JSON.stringify(e)}\n`)
    })
    assert.equal(b.host.get('mig-g')?.status(), 'running')
    assert.equal(a.host.get('mig-g'), undefined, 'A let go of its copy')
    const c1 = await memcheck(b, 'check')
    assert.match(c1, /^OK pages=16384 /, `memory checker after A→B: ${c1}`)
    const s1 = await memcheck(b, 'stats')
    const up0 = field(s0, 'uptime_ms')
    const up1 = field(s1, 'uptime_ms')
    assert.ok(up1 >= up0, `uptime went back: ${up0} → ${up1}`)
    assert.ok(up1 - up0 <= performance.now() - t0 + 5000, `uptime jumped: ${up0} → ${up1} (rebooted?)`)
    assert.ok(field(c1, 'gen') >= field(s0, 'gen'), 'the checker generation never goes back')
    process.stdout.write(
      `      A→B: total ${Math.round(there.totalMs)} ms, downtime ${Math.round(there.downtimeMs)} ms, wire ${(there.wireBytes / MiB).toFixed(1)} MiB\n`,
    )

    const back = await b.service.migrate({ vm: 'mig-g', to: 'A' })
    await b.service.settled()
    assert.equal(a.host.get('mig-g')?.status(), 'running')
    assert.equal(b.host.get('mig-g'), undefined)
    const c2 = await memcheck(a, 'check')
    assert.match(c2, /^OK pages=16384 /, `memory checker after B→A: ${c2}`)
    const s2 = await memcheck(a, 'stats')
    assert.ok(field(s2, 'uptime_ms') >= up1, 'uptime continuous on the way back')
    assert.ok(field(c2, 'gen') >= field(c1, 'gen'))
    // What the churn thread rewrote on B (4 KiB pages; a page rewritten twice counts twice, as a page
    // resent in a later round travels twice). It grows with the move's wall-clock time: on a loaded box
    // the return took longer and put 25.8 MB on the wire against a flat 5%-of-RAM bound.
    const churned = (field(s2, 'churned') - field(s1, 'churned')) * 4096
    process.stdout.write(
      `      B→A: total ${Math.round(back.totalMs)} ms, downtime ${Math.round(back.downtimeMs)} ms, wire ${(back.wireBytes / MiB).toFixed(2)} MiB, from cache ${(back.dedupBytes / MiB).toFixed(1)} MiB, churned on B ${(churned / MiB).toFixed(1)} MiB\n`,
    )
    // Cheap: only what changed travels — the churned pages plus 5% of RAM for the rest (the guest
    // kernel's own writes, offers, device state; 3-6 MiB in all on a quiet box).
    assert.ok(
      back.wireBytes <= churned + 0.05 * 256 * MiB,
      `the return move put ${back.wireBytes} bytes on the wire (> the ${churned} B churned on B + 5% of 256 MiB)`,
    )
    assert.ok(back.dedupBytes >= 64 * MiB, `the return move filled ${back.dedupBytes} B from A's cache`)
    await memcheck(a, 'churn 0')
  })
})
