import { mkdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { readJsonObjectFile, writeFileDurable } from '../../src/base/fs.ts'
import type { StartOptions, Vm, VmDriver } from '../driver/interfaces.ts'
import type { VmManager } from '../manager.ts'
import type { VmSpec } from '../spec.ts'
import { allocateIncomingRam } from './host.ts'
import type { PostcopyRecord, VmHost } from './interfaces.ts'
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
  // Incoming post-copies still paging (#15): what a restarted agent needs to take the pager back.
  const postcopyFile = join(init.stateDir, 'migration-postcopy.json')
  const postcopies = new Map<string, PostcopyRecord>()
  for (const [k, v] of Object.entries(await readJsonObjectFile(postcopyFile)))
    if (isPostcopyRecord(v) && v.vm === k) postcopies.set(k, v)
  let writing: Promise<void> = Promise.resolve()
  const persistPostcopies = () => {
    // Serialised: a later state never lands before an earlier one.
    const p = writing.then(async () => {
      await mkdir(init.stateDir, { recursive: true, mode: 0o700 })
      await writeFileDurable(postcopyFile, JSON.stringify(Object.fromEntries(postcopies)))
    })
    writing = p.catch(() => {})
    return p
  }
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
    startIncoming: (spec, memoryPath, signal, options) =>
      init.driver.start(spec, {
        ...init.startOptions,
        incoming: true,
        memoryPath,
        ...(options?.volumeSeed === undefined ? {} : { volumeSeed: options.volumeSeed }),
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
    async beginPostcopy(record) {
      postcopies.set(record.vm, { ...record })
      await persistPostcopies()
    },
    async endPostcopy(name) {
      if (!postcopies.delete(name)) return
      await persistPostcopies()
    },
    postcopies: () => [...postcopies.values()].map((r) => ({ ...r })),
    async readopt(name) {
      await init.manager.readopt(name)
    },
  }
}

function isPostcopyRecord(v: unknown): v is PostcopyRecord {
  const r = v as Partial<PostcopyRecord> | null
  return (
    typeof r === 'object' &&
    r !== null &&
    typeof r.vm === 'string' &&
    typeof r.from === 'string' &&
    typeof r.ramPath === 'string' &&
    typeof r.owed === 'string' &&
    [r.token, r.pid, r.ramSize, r.chunkSize, r.qemuFd].every((n) => Number.isSafeInteger(n))
  )
}
