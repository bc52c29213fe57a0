/**
 * Two migration "hosts" in one process for the QEMU system test and the benchmark: each has its own
 * QEMU driver (own RAM and run dirs), its own chunk store as RAM cache, and a migration service; the
 * two are joined by an in-memory link. Every guest gets a user-network port forward to its memory
 * checker on each host, so a test can talk to it wherever it runs.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtemp, readdir, rm } from 'node:fs/promises'
import { createServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ensureGuest, type GuestImage } from '../../fixtures/guest/build.ts'
import { COUNTER_PORT, MEMCHECK_PORT, READY_RE } from '../../fixtures/guest/ports.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import { createMigrationService, type MigrationService } from '../../src/agent/services/migration.ts'
import { createLogger, type Logger } from '../../src/base/log.ts'
import type { Vm, VmDriver } from '../../vm/driver/interfaces.ts'
import { createStoreRamCache } from '../../vm/migration/cache.ts'
import { createDriverHost, type DriverHost } from '../../vm/migration/host.ts'
import { overlayMigrationNetwork } from '../../vm/migration/overlay.ts'
import type { MigrationTuning } from '../../vm/migration/source.ts'
import { postcopySupport } from '../../vm/postcopy/pager.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { type VmSpec, validateVmSpec } from '../../vm/spec.ts'
import { createCgroupThrottle } from '../../vm/throttle/cgroup.ts'
import { freePort, waitConsole } from '../helpers/vm.ts'
import { socketNetwork } from './_migrate-socket.ts'

export interface TestHost {
  id: string
  driver: VmDriver
  host: DriverHost
  service: MigrationService
  ramDir: string
  runDir: string
  /** Host ports forwarded to the guest's memory checker / counter when the guest runs here. */
  memPort: number
  counterPort: number
  /** Host ports of the extra guest ports (`guestPorts` option) when the guest runs here. */
  ports: Map<number, number>
  /** Where the host's VM disks go. */
  diskDir: string
}

export interface TwoHosts {
  a: TestHost
  b: TestHost
  guest: GuestImage
  spec(name: string, memoryMiB?: number): VmSpec
  /** Boots a guest on `on` and waits for its ready line. */
  boot(on: TestHost, spec: VmSpec): Promise<Vm>
  /** Stops every VM and service, removes every directory; returns files that were left behind. */
  destroy(): Promise<string[]>
}

function accel(): 'kvm' | 'tcg' {
  // TCG unless told otherwise: the default CPU model did not boot the guest under this machine's KVM.
  return process.env.MESH_ACCEL === 'kvm' ? 'kvm' : 'tcg'
}

/** Host B in a child process, joined to A by a unix socket (see _migrate-child.ts). */
async function spawnChildB(
  tag: string,
  ports: { memPort: number; counterPort: number },
): Promise<{ socket: Socket; child: ChildProcess; sockPath: string }> {
  const sockPath = join(tmpdir(), `${tag}-${process.pid}.sock`)
  await rm(sockPath, { force: true })
  const server = createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(sockPath, () => resolve())
  })
  const here = dirname(fileURLToPath(import.meta.url))
  const child = spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      join(here, '_migrate-child.ts'),
      sockPath,
      tag,
      String(ports.memPort),
      String(ports.counterPort),
    ],
    {
      cwd: join(here, '..', '..'),
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  )
  try {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('host B (child) did not connect')), 60_000)
      server.once('connection', (s) => {
        clearTimeout(timer)
        resolve(s)
      })
      child.once('exit', (code) => reject(new Error(`host B (child) exited with ${code}`)))
    })
    await new Promise<void>((resolve, reject) => {
      child.stdout?.once('data', () => resolve())
      child.once('exit', (code) => reject(new Error(`host B (child) exited with ${code}`)))
    })
    return { socket, child, sockPath }
  } catch (err) {
    child.kill('SIGKILL')
    throw err
  } finally {
    server.close()
  }
}

export async function createTwoHosts(
  options: {
    tuning?: MigrationTuning
    log?: Logger
    tag?: string
    /** Host B's migration service runs in a child process (its own event loop), over a unix socket. */
    processes?: boolean
    /** More guest TCP ports to forward on each host (e.g. the Debian guest's block checker). */
    guestPorts?: number[]
  } = {},
): Promise<TwoHosts> {
  const guest = await ensureGuest()
  const log = options.log ?? createLogger({ level: 'warn' })
  const net = createMemoryNetwork()
  const tag = options.tag ?? 'mig'
  const stores: string[] = []
  const bPorts = { memPort: await freePort(), counterPort: await freePort() }
  const childB = options.processes === true ? await spawnChildB(tag, bPorts) : undefined
  const make = async (id: string): Promise<TestHost> => {
    const ramDir = `/dev/shm/${tag}-${id}-${process.pid}`
    const runDir = join(tmpdir(), `${tag}-${id}-${process.pid}`)
    const memPort = id === 'B' ? bPorts.memPort : await freePort()
    const counterPort = id === 'B' ? bPorts.counterPort : await freePort()
    const diskDir = `${runDir}-disks`
    const ports = new Map<number, number>()
    for (const g of options.guestPorts ?? []) ports.set(g, await freePort())
    const driver = createQemuDriver({
      ramDir,
      runDir,
      diskDir,
      accel: accel(),
      startTimeoutMs: 120_000,
      commandTimeoutMs: 120_000,
    })
    const testNet = {
      hostfwd: [
        { hostPort: memPort, guestPort: MEMCHECK_PORT },
        { hostPort: counterPort, guestPort: COUNTER_PORT },
        ...[...ports].map(([guestPort, hostPort]) => ({ hostPort, guestPort })),
      ],
    }
    const host = createDriverHost({ driver, ramDir, startOptions: () => ({ testNet }) })
    const storeDir = await mkdtemp(join(tmpdir(), `${tag}-store-${id}-`))
    stores.push(storeDir)
    const store = await openChunkStore({ dir: storeDir })
    const service = createMigrationService({
      network:
        childB !== undefined && id === 'A'
          ? socketNetwork('A', 'B', childB.socket)
          : overlayMigrationNetwork(net.node(id)),
      host,
      cache: createStoreRamCache(store),
      log: log.child(id),
      isMember: (p) => p === 'A' || p === 'B',
      throttle: createCgroupThrottle(),
      postcopy: async () => (await postcopySupport()).ok,
      tuning: { timeoutMs: 120_000, ...options.tuning },
    })
    await service.start(new AbortController().signal)
    return { id, driver, host, service, ramDir, runDir, memPort, counterPort, ports, diskDir }
  }
  const a = await make('A')
  const b = await make('B')
  net.connect('A', 'B')
  if (childB !== undefined) {
    // B's own service is the child's: moves B→A go through A's forwarding (locate + request).
    await b.service.stop()
    const viaA = a.service
    b.service = {
      name: 'migration (child B, via A)',
      start: async () => {},
      stop: async () => {},
      handlers: () => ({}),
      status: () => ({}),
      migrate: (p, o) => viaA.migrate(p, o),
      settled: async () => {},
      tokens: (vm, signal) => viaA.tokens(vm, signal),
      recover: () => Promise.reject(new Error('not in the bench')),
    }
  }
  return {
    a,
    b,
    guest,
    spec: (name, memoryMiB = 256) =>
      validateVmSpec({
        name,
        memoryMiB,
        vcpus: 1,
        kernel: guest.kernel,
        initrd: guest.initrd,
        ip: '10.0.2.15/24',
        cmdline: `quiet panic=-1 mesh.gw=10.0.2.2 mesh.name=${name}`,
      }),
    async boot(on, spec) {
      const vm = await on.driver.start(spec, {
        testNet: {
          hostfwd: [
            { hostPort: on.memPort, guestPort: MEMCHECK_PORT },
            { hostPort: on.counterPort, guestPort: COUNTER_PORT },
            ...[...on.ports].map(([guestPort, hostPort]) => ({ hostPort, guestPort })),
          ],
        },
      })
      on.host.add(vm)
      await waitConsole(vm, READY_RE)
      return vm
    },
    async destroy() {
      const left: string[] = []
      if (childB !== undefined) {
        const exited = new Promise((r) => childB.child.once('exit', r))
        childB.child.kill('SIGTERM')
        await Promise.race([exited, new Promise((r) => setTimeout(r, 30_000))])
        childB.child.kill('SIGKILL')
        childB.socket.destroy()
        await rm(childB.sockPath, { force: true })
      }
      for (const h of [a, b]) {
        await h.service.stop()
        await h.host.stopAll()
      }
      for (const h of [a, b]) {
        for (const d of [h.ramDir, h.runDir, h.diskDir]) {
          const names = await readdir(d).catch(() => [] as string[])
          left.push(...names.map((n) => join(d, n)))
          await rm(d, { recursive: true, force: true })
        }
      }
      for (const s of stores) await rm(s, { recursive: true, force: true })
      return left
    },
  }
}
