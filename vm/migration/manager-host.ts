import { randomBytes } from 'node:crypto'
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { StartOptions, Vm, VmDriver } from '../driver/interfaces.ts'
import type { VmManager } from '../manager.ts'
import type { VmSpec } from '../spec.ts'
import { allocateIncomingRam } from './host.ts'
import type { SwitchRecord, VmHost } from './interfaces.ts'

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

async function readJsonObject(file: string): Promise<Record<string, unknown>> {
  try {
    const parsed = JSON.parse(await readFile(file, 'utf8')) as unknown
    if (typeof parsed === 'object' && parsed !== null) return parsed as Record<string, unknown>
  } catch {
    // first start: nothing yet
  }
  return {}
}

function isSwitchRecord(v: unknown): v is SwitchRecord {
  const r = v as Partial<SwitchRecord> | null
  return (
    typeof r === 'object' &&
    r !== null &&
    typeof r.vm === 'string' &&
    typeof r.to === 'string' &&
    typeof r.at === 'number' &&
    Number.isSafeInteger(r.token)
  )
}

/**
 * The agent's VmHost: VMs of its VmManager; fencing tokens and switches in progress persisted before
 * any call returns (a source agent killed mid-switch finds its switches again when it restarts).
 */
export async function createManagerHost(init: ManagerHostInit): Promise<VmHost> {
  const file = join(init.stateDir, 'migration-tokens.json')
  const switchFile = join(init.stateDir, 'migration-switches.json')
  const tokens = new Map<string, number>()
  for (const [k, v] of Object.entries(await readJsonObject(file)))
    if (typeof v === 'number' && Number.isSafeInteger(v)) tokens.set(k, v)
  const switches = new Map<string, SwitchRecord>()
  for (const [k, v] of Object.entries(await readJsonObject(switchFile)))
    if (isSwitchRecord(v) && v.vm === k) switches.set(k, { vm: v.vm, token: v.token, to: v.to, at: v.at })
  let writing: Promise<void> = Promise.resolve()
  const write = (path: string, body: () => string) => {
    // Serialised: a later write never lands before an earlier one.
    writing = writing.then(async () => {
      await mkdir(init.stateDir, { recursive: true, mode: 0o700 })
      const tmp = `${path}.${randomBytes(4).toString('hex')}.tmp`
      await writeFile(tmp, body(), { mode: 0o600 })
      await rename(tmp, path)
    })
    return writing
  }
  const persist = () => write(file, () => JSON.stringify(Object.fromEntries(tokens)))
  const persistSwitches = () => write(switchFile, () => JSON.stringify(Object.fromEntries(switches)))
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
    async beginSwitch(record) {
      switches.set(record.vm, { ...record })
      await persistSwitches()
    },
    async endSwitch(name) {
      if (!switches.delete(name)) return
      await persistSwitches()
    },
    switches: () => [...switches.values()].map((r) => ({ ...r })),
  }
}
