import { rm } from 'node:fs/promises'
import type { StartOptions, Vm, VmDriver } from '../driver/interfaces.ts'
import type { VmManager } from '../manager.ts'
import type { VmSpec } from '../spec.ts'
import { allocateIncomingRam } from './host.ts'
import type { VmHost } from './interfaces.ts'
import { createFileLedger } from './ledger.ts'

export interface ManagerHostInit {
  manager: VmManager
  driver: VmDriver
  /** Where incoming RAM files go (the driver's RAM dir). */
  ramDir: string
  /** The fencing ledger lives here (ledger.ts: migration-{tokens,switches,ledger}.json, written durably). */
  stateDir: string
  startOptions?: Omit<StartOptions, 'incoming' | 'memoryPath' | 'signal'>
  /** Resolves `image:NAME[:TAG]` references of a spec to local files (pulls them through the chunk
   *  layer); runs while the RAM arrives, as part of starting the incoming VM. */
  resolveImages?: (spec: VmSpec, signal?: AbortSignal) => Promise<VmSpec>
}

/**
 * The agent's VmHost: VMs of its VmManager; the fencing ledger persisted durably before any call returns
 * (a source agent killed mid-switch finds its switches again, a destination its commits).
 */
export async function createManagerHost(init: ManagerHostInit): Promise<VmHost> {
  const ledger = await createFileLedger(init.stateDir)
  return {
    ledger,
    handle: (vm) => init.driver.handle(vm),
    reattach: (handle, signal) => init.driver.adopt(handle, signal),
    get(name) {
      try {
        const vm = init.manager.get(name)
        const st = vm.status()
        return st === 'stopped' || st === 'exited' ? undefined : vm
      } catch {
        return undefined
      }
    },
    allocateRam: (spec: VmSpec) => allocateIncomingRam(init.ramDir, spec),
    discardRam: (path) => rm(path, { force: true }),
    startIncoming: (spec, memoryPath, signal) =>
      init.driver.start(spec, {
        ...init.startOptions,
        incoming: true,
        memoryPath,
        ...(signal ? { signal } : {}),
      }),
    async adopt(vm: Vm) {
      await init.manager.register(vm)
    },
    async release(name) {
      await init.manager.forget(name)
    },
    token: (name) => ledger.token(name),
    setToken: (name, token) => ledger.setToken(name, token),
    beginSwitch: (record) => ledger.beginSwitch(record),
    endSwitch: (name) => ledger.endSwitch(name),
    switches: () => ledger.switches(),
  }
}
