/**
 * The post-copy mechanism against real QEMU (TCG) on one host, without the network: a guest whose
 * memory checker rewrites its memory is paused on A, resumed on B before the chunks it dirtied arrived,
 * and the mesh-uffd pager places each missing chunk on first touch (served from A's paused RAM file over
 * a simulated link) and the rest in the background. Then the pager is killed half-way through a move
 * back: the guest must wait (never read zeros), and a new pager takes the same userfaultfd back from
 * QEMU and finishes. The memory checker proves every byte arrived.
 */
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { closeSync, openSync, readSync } from 'node:fs'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { MEMCHECK_PORT, READY_RE } from '../../fixtures/guest/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import type { Vm, VmDriver } from '../../vm/driver/interfaces.ts'
import { allocateIncomingRam } from '../../vm/migration/host.ts'
import { type Pager, startPager } from '../../vm/postcopy/pager.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { type VmSpec, validateVmSpec } from '../../vm/spec.ts'
import { cleanupVmDirs, freePort, LineClient, vmTestDirs, waitConsole } from '../helpers/vm.ts'

const CHUNK = 64 * 1024
const MiB = 1024 * 1024

/** The chunks whose bytes differ between two RAM files (what the source's final scan finds). */
function differing(a: string, b: string, size: number): number[] {
  const fa = openSync(a, 'r')
  const fb = openSync(b, 'r')
  const ba = Buffer.alloc(CHUNK)
  const bb = Buffer.alloc(CHUNK)
  const out: number[] = []
  try {
    for (let i = 0; i < size / CHUNK; i++) {
      readSync(fa, ba, 0, CHUNK, i * CHUNK)
      readSync(fb, bb, 0, CHUNK, i * CHUNK)
      if (!ba.equals(bb)) out.push(i)
    }
  } finally {
    closeSync(fa)
    closeSync(fb)
  }
  return out
}

function bitmapOf(chunks: number[], count: number): Uint8Array {
  const b = new Uint8Array(Math.ceil(count / 8))
  for (const c of chunks) b[c >> 3]! |= 1 << (c & 7)
  return b
}

/**
 * Serves a pager from a paused source's RAM file: chunks the guest faulted on first (after `rttMs`),
 * the rest in order, at most `rate` bytes/s. Resolves once every chunk in `owed` was placed, or when
 * `stopAfter` chunks were sent.
 */
async function serve(
  pager: Pager,
  srcPath: string,
  owed: number[],
  opts: { rate: number; rttMs: number; stopAfter?: number; background: () => boolean },
): Promise<{ faults: number; sent: number; maxFaultMs: number }> {
  const fd = openSync(srcPath, 'r')
  const done = new Set<number>()
  const urgent: { chunk: number; at: number }[] = []
  let faults = 0
  let maxFaultMs = 0
  const off = pager.onFault((chunk) => {
    faults++
    urgent.push({ chunk, at: performance.now() })
  })
  const t0 = performance.now()
  let sent = 0
  let next = 0
  try {
    while (done.size < owed.length && (opts.stopAfter === undefined || sent < opts.stopAfter)) {
      if (sent * CHUNK > ((performance.now() - t0) / 1000) * opts.rate) {
        await new Promise((r) => setTimeout(r, 2))
        continue
      }
      let chunk: number | undefined
      const u = urgent.shift()
      if (u !== undefined && !done.has(u.chunk)) {
        const wait = opts.rttMs - (performance.now() - u.at)
        if (wait > 0) await new Promise((r) => setTimeout(r, wait))
        chunk = u.chunk
        maxFaultMs = Math.max(maxFaultMs, performance.now() - u.at)
      } else if (u === undefined && opts.background()) {
        while (next < owed.length && done.has(owed[next]!)) next++
        chunk = owed[next]
      }
      if (chunk === undefined) {
        await new Promise((r) => setTimeout(r, 1))
        continue
      }
      const b = Buffer.allocUnsafe(CHUNK)
      readSync(fd, b, 0, CHUNK, chunk * CHUNK)
      done.add(chunk)
      sent++
      if (!pager.fill(chunk, b)) await pager.drain()
    }
  } finally {
    off()
    closeSync(fd)
  }
  return { faults, sent, maxFaultMs }
}

describe('post-copy pager (mesh-uffd) with real QEMU guests on one host', function () {
  this.timeout(600_000)
  const dirs = vmTestDirs('pager')
  let driver: VmDriver
  let spec: VmSpec
  const ports = new Map<Vm, number>()
  const vms: Vm[] = []

  const memcheck = async (vm: Vm, cmd: string, ms = 60_000) => {
    const c = await LineClient.connect(ports.get(vm)!, ms)
    try {
      return await c.command(cmd, ms)
    } finally {
      c.close()
    }
  }

  /** An incoming VM on a copy of `src`'s RAM as of now (the pre-copy), with its own memcheck port. */
  async function incomingCopy(src: Vm): Promise<Vm> {
    const ram = await allocateIncomingRam(dirs.ramDir, spec)
    execFileSync('cp', ['--sparse=always', src.memory.path, ram])
    const port = await freePort()
    const vm = await driver.start(spec, {
      incoming: true,
      memoryPath: ram,
      testNet: { hostfwd: [{ hostPort: port, guestPort: MEMCHECK_PORT }] },
    })
    vms.push(vm)
    ports.set(vm, port)
    return vm
  }

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['qemu-system-x86_64', 'gcc'] })
    const guest = await ensureGuest()
    driver = createQemuDriver({ ...dirs, accel: 'tcg', startTimeoutMs: 120_000, commandTimeoutMs: 120_000 })
    spec = validateVmSpec({
      name: 'pc-g',
      memoryMiB: 256,
      vcpus: 1,
      kernel: guest.kernel,
      initrd: guest.initrd,
      ip: '10.0.2.15/24',
      cmdline: 'quiet panic=-1 mesh.gw=10.0.2.2 mesh.name=pc-g',
    })
    const port = await freePort()
    const a = await driver.start(spec, {
      testNet: { hostfwd: [{ hostPort: port, guestPort: MEMCHECK_PORT }] },
    })
    vms.push(a)
    ports.set(a, port)
    await waitConsole(a, READY_RE)
    assert.match(await memcheck(a, 'fill 128', 120_000), /^OK pages=32768 /)
    assert.match(await memcheck(a, 'churn 32'), /^OK churn=32/)
  })

  after(async () => {
    await Promise.allSettled(vms.map((v) => v.stop()))
    const left = await cleanupVmDirs(dirs)
    assert.deepEqual(left, [], 'files left behind')
  })

  let onB: Vm

  it('resumes the guest before its dirty chunks arrive: each fetched on first touch, memory intact', async () => {
    const a = vms[0]!
    const b = await incomingCopy(a)
    await new Promise((r) => setTimeout(r, 1500)) // the guest dirties more after the "pre-copy"
    const before = await memcheck(a, 'stats')
    const t0 = performance.now()
    await a.pause()
    const state = await a.saveState()
    const owed = differing(a.memory.path, b.memory.path, a.memory.size)
    assert.ok(owed.length * CHUNK > 16 * MiB, `only ${owed.length} chunks dirty: the guest is not busy`)
    const pager = await startPager({
      pid: b.pid!,
      ramPath: b.memory.path,
      ramBytes: b.memory.size,
      chunkBytes: CHUNK,
    })
    assert.equal((await pager.owe(bitmapOf(owed, a.memory.size / CHUNK))).count, owed.length)
    let resumed = false
    const serving = serve(pager, a.memory.path, owed, { rate: 40e6, rttMs: 5, background: () => resumed })
    await b.loadState(state)
    await b.resume()
    resumed = true
    const pauseMs = performance.now() - t0
    // The guest answers while most of its dirty memory is still on A.
    const p0 = performance.now()
    assert.match(await memcheck(b, 'ping'), /^OK pong/)
    const pingMs = performance.now() - p0
    const s = await serving
    const stats = await pager.finish()
    process.stdout.write(
      `      ${owed.length} chunks (${((owed.length * CHUNK) / MiB).toFixed(0)} MiB) owed; paused ${Math.round(pauseMs)} ms; first ping ${Math.round(pingMs)} ms; ${s.faults} faults (longest ${Math.round(s.maxFaultMs)} ms), ${stats.zeroFaults} zero pages\n`,
    )
    assert.ok(pauseMs < 1000, `paused ${pauseMs} ms`)
    assert.ok(s.faults > 0, 'the churning guest touched owed chunks before they arrived')
    assert.equal(stats.filledChunks, owed.length)
    assert.equal(stats.owedFaults, s.faults)
    const check = await memcheck(b, 'check', 120_000)
    assert.match(check, /^OK pages=32768 /, check)
    const gen = (l: string) => Number(/gen=(\d+)/.exec(l)?.[1])
    assert.ok(gen(check) > gen(before), 'the guest went on writing on B')
    await a.stop()
    onB = b
  })

  it('a pager killed half-way: the guest waits instead of reading zeros; a new pager takes the uffd back', async () => {
    const b = onB
    const a2 = await incomingCopy(b)
    await new Promise((r) => setTimeout(r, 1500))
    await b.pause()
    const state = await b.saveState()
    const owed = differing(b.memory.path, a2.memory.path, b.memory.size)
    const bitmap = bitmapOf(owed, b.memory.size / CHUNK)
    const first = await startPager({
      pid: a2.pid!,
      ramPath: a2.memory.path,
      ramBytes: b.memory.size,
      chunkBytes: CHUNK,
    })
    assert.equal((await first.owe(bitmap)).count, owed.length)
    // Serve faults only (no background) until a third is in, so the guest runs and keeps faulting.
    let resumed = false
    const serving = serve(first, b.memory.path, owed, {
      rate: 40e6,
      rttMs: 2,
      stopAfter: Math.floor(owed.length / 3),
      background: () => resumed,
    })
    await a2.loadState(state)
    await a2.resume()
    resumed = true
    await serving
    // The agent dies: its pager goes, QEMU's own copy of the uffd keeps the registration.
    await first.quit()
    const checking = memcheck(a2, 'check', 300_000)
    await new Promise((r) => setTimeout(r, 1500))
    const racing = await Promise.race([checking.then((l) => `answered: ${l}`), Promise.resolve('waiting')])
    assert.equal(racing, 'waiting', 'with chunks missing and no pager, the check must block, not read zeros')
    const second = await startPager({
      pid: a2.pid!,
      ramPath: a2.memory.path,
      ramBytes: b.memory.size,
      chunkBytes: CHUNK,
      regrabFd: first.qemuFd,
    })
    assert.equal(second.regrabbed, true)
    const taken = await second.owe(bitmap)
    const still = taken.count
    assert.ok(still > 0 && still < owed.length, `${still} of ${owed.length} chunks still owed`)
    // Exactly the owed chunks the first pager did not place (they are the holes left).
    let bits = 0
    for (const b of taken.bitmap) for (let i = 0; i < 8; i++) bits += (b >> i) & 1
    assert.equal(bits, still)
    await serve(second, b.memory.path, owed, { rate: 80e6, rttMs: 0, background: () => true })
    const stats = await second.finish()
    assert.equal(stats.filledChunks, still)
    const check = await checking
    assert.match(check, /^OK pages=32768 /, check)
    process.stdout.write(
      `      pager killed with ${still} of ${owed.length} chunks owed; taken back; memory intact\n`,
    )
    await b.stop()
  })
})
