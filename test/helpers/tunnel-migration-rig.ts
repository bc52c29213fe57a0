/**
 * Live migration with the tunnel, in one process: N hosts, each with a QEMU driver (guest NIC on a
 * `-netdev stream` socket), a chunk store as RAM cache, a migration service and a tunnel switch, all
 * joined by in-memory links; plus a client member `T` whose host TAP port sits in a private network
 * namespace, from where a test streams TCP data to the guest while it moves.
 *
 * The tunnel follows the VM through the VmHost hooks migration already calls, wired by the agent's own
 * code (src/agent/vm-tunnel.ts createVmTunnelPlug, which the agent composes with its VM manager):
 * startIncoming → attachVm(mac, the new QEMU's net socket) with frames held; the guest resuming →
 * announce(mac); release, or the VM stopping for good → detachVm(mac) (the old host forwards
 * stragglers for the grace period).
 */
import type { ChildProcess } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { READY_RE } from '../../fixtures/guest/ports.ts'
import { deleteNetns, killNetnsProcesses, runChecked } from '../../fixtures/testnet/netns.ts'
import type { StreamEchoResult } from '../../fixtures/testnet/stream-client.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import { TUNNEL_MTU } from '../../net/tunnel/interfaces.ts'
import { createMigrationService, type MigrationService } from '../../src/agent/services/migration.ts'
import { createTunnelService, type TunnelService } from '../../src/agent/services/tunnel.ts'
import { createVmTunnelPlug } from '../../src/agent/vm-tunnel.ts'
import { createLogger, type Logger } from '../../src/base/log.ts'
import type { Vm, VmDriver } from '../../vm/driver/interfaces.ts'
import { createStoreRamCache } from '../../vm/migration/cache.ts'
import { createDriverHost, type DriverHost } from '../../vm/migration/host.ts'
import { overlayMigrationNetwork } from '../../vm/migration/overlay.ts'
import { createQemuDriver } from '../../vm/qemu/driver.ts'
import { type VmSpec, validateVmSpec } from '../../vm/spec.ts'
import { runStreamClient } from './stream-echo.ts'
import { waitConsole } from './vm.ts'

export interface MigHost {
  id: string
  driver: VmDriver
  host: DriverHost
  migration: MigrationService
  tunnel: TunnelService
}

export interface MigRig {
  hosts: Map<string, MigHost>
  netns: string
  spec(name: string, ip: string, memoryMiB?: number): VmSpec
  boot(on: string, spec: VmSpec): Promise<Vm>
  /** Starts the stream client in T's namespace; `stop()` ends it and resolves its result. */
  streamEcho(ip: string, port: number): { stop(): Promise<StreamEchoResult> }
  ping(ip: string): Promise<string>
  destroy(): Promise<void>
}

export async function createMigRig(ids: string[], opts: { log?: Logger; subnet: string }): Promise<MigRig> {
  const guest = await ensureGuest()
  const log = opts.log ?? createLogger({ level: 'warn' })
  const net = createMemoryNetwork()
  const tag = `tm${process.pid.toString(36)}`
  const netns = `mtunmig-${process.pid.toString(36)}`
  const hosts = new Map<string, MigHost>()
  const dirs: string[] = []
  const children = new Set<ChildProcess>()
  let client: TunnelService | undefined
  let nsCreated = false

  const destroy = async () => {
    for (const c of children) c.kill('SIGKILL')
    for (const h of hosts.values()) {
      await h.migration.stop().catch(() => {})
      await h.host.stopAll().catch(() => {})
      await h.tunnel.stop().catch(() => {})
    }
    hosts.clear()
    await client?.stop().catch(() => {})
    if (nsCreated) {
      await killNetnsProcesses(netns, 500).catch(() => {})
      await deleteNetns(netns).catch(() => {})
      nsCreated = false
    }
    for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true })
  }

  try {
    await runChecked('ip', ['netns', 'add', netns])
    nsCreated = true
    await runChecked('ip', ['-n', netns, 'link', 'set', 'lo', 'up'])
    client = createTunnelService({
      overlay: net.node('T'),
      log: log.child('T'),
      tap: { name: `${tag}T`.slice(0, 15), address: `${opts.subnet}.1/24`, netns },
    })
    await client.start(new AbortController().signal)
    for (const id of ids) {
      const ramDir = `/dev/shm/${tag}-${id}`
      const runDir = join(tmpdir(), `${tag}-${id}`)
      dirs.push(ramDir, runDir)
      const driver = createQemuDriver({
        ramDir,
        runDir,
        accel: 'tcg',
        startTimeoutMs: 120_000,
        commandTimeoutMs: 120_000,
      })
      const tunnel = createTunnelService({ overlay: net.node(id), log: log.child(`${id}/tunnel`) })
      await tunnel.start(new AbortController().signal)
      const plug = createVmTunnelPlug(driver, () => tunnel, { holdWhilePaused: true })
      const inner = plug.wrap(createDriverHost({ driver, ramDir }))
      const host: DriverHost = {
        ...inner,
        add(vm) {
          inner.add(vm)
          plug.started(vm)
        },
      }
      const storeDir = await mkdtemp(join(tmpdir(), `${tag}-store-${id}-`))
      dirs.push(storeDir)
      const store = await openChunkStore({ dir: storeDir })
      const migration = createMigrationService({
        network: overlayMigrationNetwork(net.node(id)),
        host,
        cache: createStoreRamCache(store),
        log: log.child(id),
        isMember: (p) => ids.includes(p),
        tuning: { timeoutMs: 180_000 },
      })
      await migration.start(new AbortController().signal)
      hosts.set(id, { id, driver, host, migration, tunnel })
    }
    const all = ['T', ...ids]
    for (let i = 0; i < all.length; i++)
      for (let j = i + 1; j < all.length; j++) net.connect(all[i]!, all[j]!)
  } catch (err) {
    await destroy()
    throw err
  }

  return {
    hosts,
    netns,
    spec: (name, ip, memoryMiB = 128) =>
      validateVmSpec({
        name,
        memoryMiB,
        vcpus: 1,
        kernel: guest.kernel,
        initrd: guest.initrd,
        ip,
        cmdline: `quiet panic=-1 mesh.mtu=${TUNNEL_MTU} mesh.name=${name}`,
      }),
    async boot(on, spec) {
      const h = hosts.get(on)!
      const vm = await h.driver.start(spec)
      h.host.add(vm)
      await waitConsole(vm, READY_RE)
      h.tunnel.switch.announce(vm.spec.mac)
      return vm
    },
    streamEcho(ip, port) {
      const run = runStreamClient(netns, ip, port, 3_600_000)
      children.add(run.child)
      return {
        stop: () => run.stop().finally(() => children.delete(run.child)),
      }
    },
    async ping(ip) {
      const r = await runChecked('ip', ['netns', 'exec', netns, 'busybox', 'ping', '-c', '3', '-W', '5', ip])
      return r.stdout
    },
    destroy,
  }
}
