/**
 * Records the dirty-rate traces the estimator and throttle unit tests replay
 * (test/unit/traces/*.json): a real QEMU guest (TCG) whose memory checker runs a workload, its RAM file
 * scanned by the compare dirty tracker about once a second, and, for the throttle trace, the dirty rate
 * at each throttle level the controller steps through (cgroup CPU limit on the vCPU thread).
 *
 *   flock /tmp/mesh-heavy.lock npx tsx test/bench/_record-traces.ts
 */
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { MEMCHECK_PORT, READY_RE } from '../../fixtures/guest/ports.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { createCgroupThrottle } from '../../vm/throttle/cgroup.ts'
import { THROTTLE_LEVELS } from '../../vm/throttle/controller.ts'
import { cleanupVmDirs, freePort, LineClient, vmTestDirs, waitConsole } from '../helpers/vm.ts'

const OUT = join(import.meta.dirname, '..', 'unit', 'traces')
const MiB = 1024 * 1024

interface Sample {
  /** ms since the trace began. */
  atMs: number
  intervalMs: number
  dirtyBytes: number
  /** Distinct bytes dirtied since the trace began. */
  hotBytes: number
  level?: number
}

async function main(): Promise<void> {
  mkdirSync(OUT, { recursive: true })
  const guest = await ensureGuest()
  const dirs = vmTestDirs('traces')
  const port = await freePort()
  const driver = createQemuDriver({ ...dirs, accel: 'tcg' })
  const spec = validateVmSpec({
    name: 'trace',
    memoryMiB: 512,
    vcpus: 1,
    kernel: guest.kernel,
    initrd: guest.initrd,
    ip: '10.0.2.15/24',
    cmdline: 'quiet panic=-1 mesh.gw=10.0.2.2 mesh.name=trace',
  })
  const vm = await driver.start(spec, {
    testNet: { hostfwd: [{ hostPort: port, guestPort: MEMCHECK_PORT }] },
  })
  try {
    await waitConsole(vm, READY_RE)
    const c = await LineClient.connect(port)
    const record = async (name: string, setup: string[], seconds: number, meta: Record<string, unknown>) => {
      for (const cmd of setup) process.stderr.write(`${name}: ${cmd} → ${await c.command(cmd, 300_000)}\n`)
      const tr = vm.dirtyTracker({ method: 'compare' })
      await tr.start()
      const t0 = performance.now()
      const hot = new Set<number>()
      const samples: Sample[] = []
      while (performance.now() - t0 < seconds * 1000) {
        await new Promise((r) => setTimeout(r, 1000))
        const r = await tr.collect()
        for (const i of r.chunks) hot.add(i)
        samples.push({
          atMs: Math.round(performance.now() - t0),
          intervalMs: Math.round(r.intervalMs),
          dirtyBytes: r.dirtyBytes,
          hotBytes: hot.size * r.chunkSize,
        })
      }
      await tr.close()
      writeFileSync(join(OUT, `${name}.json`), `${JSON.stringify({ ...meta, samples }, null, 1)}\n`)
      process.stderr.write(`${name}: ${samples.length} samples\n`)
    }
    const common = { guestMiB: 512, chunkSize: 64 * 1024, recordedWith: 'test/bench/_record-traces.ts' }
    await record('idle', [], 6, { ...common, workload: 'idle busybox guest' })
    await record('moderate', ['fill 64', 'churn 8 16'], 8, {
      ...common,
      workload: 'memcheck fill 64, churn 8 MiB/s over 16 MiB',
    })
    await record('hot', ['fill 384', 'churn 64'], 10, {
      ...common,
      workload: 'memcheck fill 384, churn 64 MiB/s (issue #15)',
    })

    // Throttle response: the hot workload at each level, ~3 s per level, then lifted.
    const provider = createCgroupThrottle()
    const avail = await provider.available()
    if (!avail.ok) throw new Error(avail.reason)
    const limiter = await provider.forProcess(vm.pid!, 'trace')
    const tr = vm.dirtyTracker({ method: 'compare' })
    await tr.start()
    const t0 = performance.now()
    const samples: Sample[] = []
    try {
      for (const level of [...THROTTLE_LEVELS, 0]) {
        await limiter.set(level)
        await tr.collect()
        for (let k = 0; k < 3; k++) {
          await new Promise((r) => setTimeout(r, 1000))
          const r = await tr.collect()
          samples.push({
            atMs: Math.round(performance.now() - t0),
            intervalMs: Math.round(r.intervalMs),
            dirtyBytes: r.dirtyBytes,
            hotBytes: 0,
            level,
          })
        }
        const last = samples.slice(-3)
        const rate =
          (last.reduce((s, x) => s + x.dirtyBytes, 0) * 1000) / last.reduce((s, x) => s + x.intervalMs, 0)
        process.stderr.write(`throttle ${level}: ${(rate / MiB).toFixed(1)} MiB/s\n`)
      }
    } finally {
      await limiter.lift()
      await tr.close()
    }
    writeFileSync(
      join(OUT, 'throttle-hot.json'),
      `${JSON.stringify({ ...common, workload: 'memcheck fill 384, churn 64 MiB/s; vCPU throttled by cgroup', backend: limiter.backend, samples }, null, 1)}\n`,
    )
    c.close()
  } finally {
    await vm.stop()
    await cleanupVmDirs(dirs)
  }
}

await main()
