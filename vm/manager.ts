import { EventEmitter } from 'node:events'
import { mkdir, readdir, readFile, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { writeFileDurable } from '../src/base/fs.ts'
import { processAlive } from '../src/base/process.ts'
import { tailLines } from './driver/base.ts'
import type { StartOptions, Vm, VmDriver, VmHandle, VmStatus } from './driver/interfaces.ts'
import { type VmExitInfo, VmNotFoundError, VmStateError } from './errors.ts'
import type { VmSpec } from './spec.ts'

/** What `mesh vm ls` shows about one VM. `unreachable`: its process lives but we cannot control it. */
export interface VmInfo {
  name: string
  status: VmStatus | 'unreachable'
  pid: number | undefined
  memoryMiB: number
  vcpus: number
  mac: string
  ip: string | undefined
  memoryPath: string
  consolePath: string | undefined
  /** The VM's writable disk (spec.volume), when it has one. */
  volumePath?: string
  startedAt: string
  exit?: VmExitInfo
}

/**
 * The operations the CLI needs, whether served by a local VmManager (standalone, `--state DIR`) or by
 * the agent's control API (same methods over the socket).
 */
export interface VmControl {
  run(spec: VmSpec): Promise<VmInfo>
  list(): Promise<VmInfo[]>
  stop(name: string): Promise<VmInfo>
  console(name: string, lines?: number): Promise<string[]>
  /** Lets go of the VMs without stopping them (the process is about to exit). */
  close(): Promise<void>
}

/** The file kept per VM under the state dir, so a restarted agent can find its VMs again. */
interface VmRecord {
  version: 1
  name: string
  handle: VmHandle
  startedAt: string
  exit?: VmExitInfo
}

interface Entry {
  record: VmRecord
  vm: Vm | undefined
  unreachable: boolean
}

export interface VmManagerEvents {
  /** A VM's process ended on its own (crash, guest poweroff, kill): the exit status and last lines. */
  exited: [{ name: string; exit: VmExitInfo }]
  /** A VM is in this manager's charge: run here, arrived by migration, or re-adopted by init(). */
  started: [{ name: string }]
  stopped: [{ name: string }]
}

export interface VmManagerOptions {
  driver: VmDriver
  /** Directory for the per-VM records (`<state>/vms`). */
  dir: string
  /** Start options applied to every run() (tests: testNet). */
  startOptions?: Omit<StartOptions, 'signal' | 'incoming' | 'memoryPath'>
}

/**
 * Runs the VMs of one host and remembers them on disk. The agent hosts one; the CLI uses one directly
 * when no agent runs. init() re-adopts VMs that outlived the previous manager (through their QMP
 * sockets) and reports those that died meanwhile, with their last console lines.
 */
export class VmManager extends EventEmitter<VmManagerEvents> implements VmControl {
  private readonly entries = new Map<string, Entry>()
  private readonly driver: VmDriver
  private readonly dir: string

  constructor(private readonly options: VmManagerOptions) {
    super()
    this.driver = options.driver
    this.dir = options.dir
  }

  /** Loads the records and re-adopts every VM that still runs. */
  async init(signal?: AbortSignal): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 })
    for (const file of await readdir(this.dir)) {
      if (!file.endsWith('.json')) continue
      let record: VmRecord
      try {
        record = JSON.parse(await readFile(join(this.dir, file), 'utf8')) as VmRecord
        if (record.version !== 1 || typeof record.name !== 'string') continue
      } catch {
        continue // a torn write of a record we never finished; the next run() rewrites it
      }
      if (this.entries.has(record.name)) continue
      const entry: Entry = { record, vm: undefined, unreachable: false }
      this.entries.set(record.name, entry)
      if (record.exit !== undefined) continue
      try {
        const vm = await this.driver.adopt(record.handle, signal)
        this.attach(entry, vm)
        // Listeners (the tunnel, which plugs the guest's NIC back into the switch) must hear of VMs
        // that outlived the previous agent too, or a restart would leave them without a network.
        this.emit('started', { name: record.name })
      } catch {
        if (processAlive(record.handle.pid)) {
          // Alive but its QMP socket does not answer (another process holds it): leave it alone.
          entry.unreachable = true
        } else {
          await this.markLost(entry)
        }
      }
    }
  }

  /** A VM that died while nobody watched: keep its last lines, remove its leftovers. */
  private async markLost(entry: Entry): Promise<void> {
    const paths = entry.record.handle.paths
    const lastLines = [
      ...(paths.console ? await tailLines(paths.console, 20) : []),
      ...(paths.stderr ? await tailLines(paths.stderr, 20) : []),
    ].slice(-20)
    entry.record.exit = { code: null, signal: null, lastLines }
    if (paths.dir) await rm(paths.dir, { recursive: true, force: true })
    await rm(entry.record.handle.memoryPath, { force: true })
    await this.save(entry.record)
    this.emit('exited', { name: entry.record.name, exit: entry.record.exit })
  }

  private attach(entry: Entry, vm: Vm): void {
    entry.vm = vm
    entry.unreachable = false
    vm.once('exited', (e) => {
      const { at: _at, ...exit } = e
      entry.record.exit = exit
      void this.save(entry.record).catch(() => {})
      this.emit('exited', { name: entry.record.name, exit })
    })
  }

  /** Durably (src/base/fs.ts): which VMs this host runs decides ownership after a restart. */
  private async save(record: VmRecord): Promise<void> {
    await writeFileDurable(join(this.dir, `${record.name}.json`), `${JSON.stringify(record, null, 2)}\n`)
  }

  private info(entry: Entry): VmInfo {
    const { record, vm } = entry
    const spec = record.handle.spec
    const status: VmInfo['status'] = entry.unreachable
      ? 'unreachable'
      : record.exit !== undefined
        ? 'exited'
        : (vm?.status() ?? 'exited')
    const info: VmInfo = {
      name: record.name,
      status,
      pid: record.handle.pid,
      memoryMiB: spec.memoryMiB,
      vcpus: spec.vcpus,
      mac: spec.mac,
      ip: spec.ip,
      memoryPath: record.handle.memoryPath,
      consolePath: record.handle.paths.console,
      startedAt: record.startedAt,
    }
    if (record.handle.paths.volume) info.volumePath = record.handle.paths.volume
    if (record.exit !== undefined) info.exit = record.exit
    return info
  }

  private entry(name: string): Entry {
    const e = this.entries.get(name)
    if (e === undefined) throw new VmNotFoundError(name)
    return e
  }

  async run(spec: VmSpec, signal?: AbortSignal): Promise<VmInfo> {
    const old = this.entries.get(spec.name)
    if (old !== undefined && old.record.exit === undefined) {
      throw new VmStateError(`a VM named '${spec.name}' is already here (status ${this.info(old).status})`)
    }
    const vm = await this.driver.start(spec, { ...this.options.startOptions, ...(signal ? { signal } : {}) })
    return this.register(vm)
  }

  /** Takes charge of a VM started elsewhere (the destination of a migration). */
  async register(vm: Vm): Promise<VmInfo> {
    const record: VmRecord = {
      version: 1,
      name: vm.spec.name,
      handle: this.driver.handle(vm),
      startedAt: new Date().toISOString(),
    }
    const entry: Entry = { record, vm: undefined, unreachable: false }
    this.attach(entry, vm)
    this.entries.set(record.name, entry)
    await this.save(record)
    this.emit('started', { name: record.name })
    return this.info(entry)
  }

  /**
   * Tries again to take control of a VM that init() found alive but could not reach (its QMP did not
   * answer: e.g. a guest that waited on post-copy memory while the agent restarted). Resolves true
   * once it is controlled here.
   */
  async readopt(name: string, signal?: AbortSignal): Promise<boolean> {
    const e = this.entries.get(name)
    if (e === undefined || !e.unreachable) return e?.vm !== undefined
    const vm = await this.driver.adopt(e.record.handle, signal)
    this.attach(e, vm)
    this.emit('started', { name })
    return true
  }

  /** The live VM of that name (for migration and the agent). */
  get(name: string): Vm {
    const e = this.entry(name)
    if (e.vm === undefined || e.record.exit !== undefined) {
      throw new VmStateError(`VM '${name}' is ${this.info(e).status}`)
    }
    return e.vm
  }

  async list(): Promise<VmInfo[]> {
    return [...this.entries.values()].map((e) => this.info(e)).sort((a, b) => a.name.localeCompare(b.name))
  }

  /** Stops the VM and forgets it (also clears an exited VM's record). */
  async stop(name: string, signal?: AbortSignal): Promise<VmInfo> {
    const e = this.entry(name)
    if (e.unreachable) {
      throw new VmStateError(
        `VM '${name}' (pid ${e.record.handle.pid}) is controlled by another process (the agent?)`,
      )
    }
    if (e.vm !== undefined) await e.vm.stop(signal)
    const info = this.info(e)
    if (e.record.exit === undefined) info.status = 'stopped'
    await this.forget(name)
    this.emit('stopped', { name })
    return info
  }

  /** Drops a VM from the records without touching it (migration handed it to another host). */
  async forget(name: string): Promise<void> {
    this.entries.delete(name)
    await rm(join(this.dir, `${name}.json`), { force: true })
  }

  async console(name: string, lines = 50): Promise<string[]> {
    const e = this.entry(name)
    if (e.vm !== undefined && e.record.exit === undefined) return e.vm.consoleTail(lines)
    if (e.record.exit !== undefined) return e.record.exit.lastLines.slice(-lines)
    const p = e.record.handle.paths.console
    return p === undefined ? [] : tailLines(p, lines)
  }

  /** Counts by status, for the agent's `mesh status`. */
  summary(): Record<string, number> {
    const counts: Record<string, number> = { total: this.entries.size }
    for (const e of this.entries.values()) {
      const st = this.info(e).status
      counts[st] = (counts[st] ?? 0) + 1
    }
    return counts
  }

  async close(): Promise<void> {
    for (const e of this.entries.values()) await e.vm?.detach()
  }
}
