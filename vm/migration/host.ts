import { randomBytes } from 'node:crypto'
import { mkdir, open, rm } from 'node:fs/promises'
import { join } from 'node:path'
import type { StartOptions, Vm, VmDriver } from '../driver/interfaces.ts'
import type { VmSpec } from '../spec.ts'
import type { PostcopyRecord, VmHost } from './interfaces.ts'
import { createMemoryLedger } from './ledger.ts'

/**
 * A fresh, sparse RAM file of the spec's size for an incoming copy. The `.in-` name is what
 * sweepIncoming() recognises as a leftover after a killed destination agent.
 */
export async function allocateIncomingRam(ramDir: string, spec: VmSpec): Promise<string> {
  await mkdir(ramDir, { recursive: true, mode: 0o700 })
  const path = join(ramDir, `${spec.name}.in-${randomBytes(4).toString('hex')}.ram`)
  const fh = await open(path, 'wx', 0o600)
  try {
    await fh.truncate(spec.memoryMiB * 1024 * 1024)
  } finally {
    await fh.close()
  }
  return path
}

export interface DriverHostInit {
  driver: VmDriver
  /** Where incoming RAM files go (for QEMU: the driver's RAM dir, e.g. /dev/shm/mesh). */
  ramDir: string
  /** Extra start options for incoming VMs (tests: a user-network port forward per host). */
  startOptions?: (spec: VmSpec) => Omit<StartOptions, 'incoming' | 'memoryPath' | 'signal'>
}

/** A VmHost over a bare driver, kept in memory: tests, benchmarks, and hosts without a VM manager. */
export interface DriverHost extends VmHost {
  /** Registers a VM started outside migration (it then can be moved away). */
  add(vm: Vm): void
  names(): string[]
  /** Stops every VM this host holds (test cleanup). */
  stopAll(): Promise<void>
  beginPostcopy(record: PostcopyRecord): Promise<void>
  endPostcopy(name: string): Promise<void>
  postcopies(): PostcopyRecord[]
}

export function createDriverHost(init: DriverHostInit): DriverHost {
  const vms = new Map<string, Vm>()
  const ledger = createMemoryLedger()
  const postcopies = new Map<string, PostcopyRecord>()
  const host: DriverHost = {
    ledger,
    handle: (vm) => init.driver.handle(vm),
    reattach: (handle, signal) => init.driver.adopt(handle, signal),
    get: (name) => {
      const vm = vms.get(name)
      if (vm === undefined) return undefined
      const st = vm.status()
      if (st === 'stopped' || st === 'exited') {
        vms.delete(name)
        return undefined
      }
      return vm
    },
    allocateRam: (spec: VmSpec) => allocateIncomingRam(init.ramDir, spec),
    discardRam: (path) => rm(path, { force: true }),
    startIncoming: (spec, memoryPath, signal, options) =>
      init.driver.start(spec, {
        ...init.startOptions?.(spec),
        incoming: true,
        memoryPath,
        ...(options?.volumeSeed === undefined ? {} : { volumeSeed: options.volumeSeed }),
        ...(signal ? { signal } : {}),
      }),
    async adopt(vm) {
      vms.set(vm.spec.name, vm)
    },
    async release(name) {
      vms.delete(name)
    },
    token: (name) => ledger.token(name),
    setToken: (name, token) => ledger.setToken(name, token),
    beginSwitch: (record) => ledger.beginSwitch(record),
    endSwitch: (name) => ledger.endSwitch(name),
    switches: () => ledger.switches(),
    async beginPostcopy(record) {
      postcopies.set(record.vm, { ...record })
    },
    async endPostcopy(name) {
      postcopies.delete(name)
    },
    postcopies: () => [...postcopies.values()].map((r) => ({ ...r })),
    add(vm) {
      vms.set(vm.spec.name, vm)
    },
    names: () => [...vms.keys()].filter((n) => host.get(n) !== undefined),
    async stopAll() {
      await Promise.allSettled([...vms.values()].map((vm) => vm.stop()))
      vms.clear()
    },
  }
  return host
}
