import { randomBytes } from 'node:crypto'
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { StartOptions, Vm, VmDriver } from '../driver/interfaces.ts'
import type { VmManager } from '../manager.ts'
import type { VmSpec } from '../spec.ts'
import { allocateIncomingRam } from './host.ts'
import type { VmHost } from './interfaces.ts'

export interface ManagerHostInit {
  manager: VmManager
  driver: VmDriver
  /** Where incoming RAM files go (the driver's RAM dir). */
  ramDir: string
  /** Fencing tokens are kept in `<stateDir>/migration-tokens.json` (written atomically). */
  stateDir: string
  startOptions?: Omit<StartOptions, 'incoming' | 'memoryPath' | 'signal'>
  /** Resolves `image:NAME[:TAG]` references of a spec to local files (pulls them through the chunk
   *  layer); runs while the RAM arrives, as part of starting the incoming VM. */
  resolveImages?: (spec: VmSpec, signal?: AbortSignal) => Promise<VmSpec>
}

/** The agent's VmHost: VMs of its VmManager, fencing tokens persisted before any call returns. */
export async function createManagerHost(init: ManagerHostInit): Promise<VmHost> {
  const file = join(init.stateDir, 'migration-tokens.json')
  const tokens = new Map<string, number>()
  try {
    const parsed = JSON.parse(await readFile(file, 'utf8')) as unknown
    if (typeof parsed === 'object' && parsed !== null) {
      for (const [k, v] of Object.entries(parsed))
        if (typeof v === 'number' && Number.isSafeInteger(v)) tokens.set(k, v)
    }
  } catch {
    // first start: no tokens yet
  }
  let writing: Promise<void> = Promise.resolve()
  const persist = () => {
    // Serialised: a later write never lands before an earlier one.
    writing = writing.then(async () => {
      await mkdir(init.stateDir, { recursive: true, mode: 0o700 })
      const tmp = `${file}.${randomBytes(4).toString('hex')}.tmp`
      await writeFile(tmp, JSON.stringify(Object.fromEntries(tokens)), { mode: 0o600 })
      await rename(tmp, file)
    })
    return writing
  }
  return {
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
    token: (name) => tokens.get(name) ?? 0,
    async setToken(name, token) {
      if (token <= (tokens.get(name) ?? 0)) return
      tokens.set(name, token)
      await persist()
    },
  }
}
