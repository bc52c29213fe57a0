/**
 * Host B of the two-process migration benchmark:
 * `node --import tsx _migrate-child.ts SOCKET TAG MEMCHECK_PORT COUNTER_PORT`.
 * Connects to host A's socket, runs a migration service with its own QEMU driver and chunk-store
 * cache, and stops everything (VMs, dirs) on SIGTERM.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { COUNTER_PORT, MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { createMigrationService } from '../../src/agent/services/migration.ts'
import { createLogger } from '../../src/base/log.ts'
import { createStoreRamCache } from '../../vm/migration/cache.ts'
import { createDriverHost } from '../../vm/migration/host.ts'
import { postcopySupport } from '../../vm/postcopy/pager.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { createCgroupThrottle } from '../../vm/throttle/cgroup.ts'
import { socketNetwork } from './_migrate-socket.ts'

const [sockPath, tag = 'migp', memPort = '0', counterPort = '0'] = process.argv.slice(2)
if (sockPath === undefined) throw new Error('usage: _migrate-child.ts SOCKET [TAG]')
const ramDir = `/dev/shm/${tag}-B-${process.pid}`
const runDir = join(tmpdir(), `${tag}-B-${process.pid}`)
const storeDir = await mkdtemp(join(tmpdir(), `${tag}-store-B-`))
const driver = createQemuDriver({
  ramDir,
  runDir,
  accel: process.env.MESH_ACCEL === 'kvm' ? 'kvm' : 'tcg',
  startTimeoutMs: 120_000,
  commandTimeoutMs: 120_000,
})
// The same user-network forwards as host A's guests: device configurations must match on both ends.
const testNet = {
  hostfwd: [
    { hostPort: Number(memPort), guestPort: MEMCHECK_PORT },
    { hostPort: Number(counterPort), guestPort: COUNTER_PORT },
  ],
}
const host = createDriverHost({ driver, ramDir, startOptions: () => ({ testNet }) })
const socket = connect(sockPath)
await new Promise<void>((resolve, reject) => {
  socket.once('connect', () => resolve())
  socket.once('error', reject)
})
const service = createMigrationService({
  network: socketNetwork('B', 'A', socket),
  host,
  cache: createStoreRamCache(await openChunkStore({ dir: storeDir })),
  log: createLogger({ level: 'warn', component: 'B' }),
  isMember: (p) => p === 'A',
  throttle: createCgroupThrottle(),
  postcopy: async () => (await postcopySupport()).ok,
  tuning: { timeoutMs: 120_000 },
})
await service.start(new AbortController().signal)
process.stdout.write('ready\n')
let stopping = false
const stop = async () => {
  if (stopping) return
  stopping = true
  await service.stop()
  await host.stopAll()
  socket.destroy()
  for (const d of [ramDir, runDir, storeDir]) await rm(d, { recursive: true, force: true })
  process.exit(0)
}
process.on('SIGTERM', () => void stop())
socket.on('close', () => void stop())
