import { mkdtemp, open, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { throwIfAborted } from '../../src/base/errors.ts'
import { CompareDirtyTracker } from '../dirty/compare.ts'
import { VmEmitter } from '../driver/base.ts'
import type {
  DirtyTracker,
  DirtyTrackerOptions,
  MemoryResource,
  StartOptions,
  Vm,
  VmDriver,
  VmHandle,
  VmStatus,
} from '../driver/interfaces.ts'
import {
  VmExitedError,
  type VmExitInfo,
  VmMigrationError,
  VmSpecError,
  VmStartError,
  VmStateError,
} from '../errors.ts'
import { parseImageRef, type VmSpec } from '../spec.ts'

const MiB = 1024 * 1024

export interface FakeDriverOptions {
  /** Where RAM files go; default a fresh temp dir per VM. */
  ramDir?: string
}

/** The fake's device state: enough to prove that what was saved is what gets loaded. */
interface FakeState {
  fake: 1
  name: string
  mac: string
  memoryMiB: number
  /** Guest "uptime": ms the guest has spent running, carried across save/load like a real guest's. */
  uptimeMs: number
}

/** Fake VMs of this process by their fake pid, so adopt() works within one process. */
const live = new Map<number, FakeVm>()
let nextPid = 4_000_000

/**
 * A driver without a hypervisor, for fast unit tests of everything above the runtime. The RAM is a
 * plain sparse temp file (tests write "guest" memory through writeMemory()), device state is JSON, and
 * the guest's uptime advances only while "running", like a real guest's clock.
 */
export function createFakeDriver(options: FakeDriverOptions = {}): VmDriver {
  return {
    name: 'fake',
    async start(spec: VmSpec, opts: StartOptions = {}): Promise<Vm> {
      throwIfAborted(opts.signal)
      for (const field of ['kernel', 'initrd', 'disk'] as const) {
        const v = spec[field]
        if (v !== undefined && parseImageRef(v) !== undefined) {
          throw new VmSpecError(
            `spec.${field}`,
            `image '${v}' must be resolved to a file (chunk layer) before start`,
          )
        }
      }
      if (spec.kernel.includes('/does-not-exist')) {
        // Lets the compliance suite check the missing-kernel error without touching the file system.
        throw new VmStartError(`spec.kernel: cannot read '${spec.kernel}': ENOENT`)
      }
      const size = spec.memoryMiB * MiB
      let path = opts.memoryPath
      let dir: string | undefined
      if (path === undefined) {
        dir = await mkdtemp(join(options.ramDir ?? tmpdir(), `fake-${spec.name}.`))
        path = join(dir, 'ram')
        const fh = await open(path, 'wx')
        await fh.truncate(size)
        await fh.close()
      } else {
        const st = await stat(path).catch((err: unknown) => {
          throw new VmStartError(`memory file '${path}' is not there`, { cause: err })
        })
        if (st.size !== size)
          throw new VmStartError(`memory file '${path}' has ${st.size} bytes, needs ${size}`)
      }
      const status: VmStatus =
        opts.incoming === true ? 'incoming' : opts.paused === true ? 'paused' : 'running'
      const vm = new FakeVm(spec, { path, size }, dir, nextPid++, status)
      live.set(vm.pid, vm)
      return vm
    },
    handle(vm: Vm): VmHandle {
      if (!(vm instanceof FakeVm)) throw new TypeError('not a fake VM')
      return { spec: vm.spec, pid: vm.pid, memoryPath: vm.memory.path, paths: {} }
    },
    async adopt(handle: VmHandle): Promise<Vm> {
      const vm = live.get(handle.pid)
      if (vm === undefined || vm.memory.path !== handle.memoryPath) {
        throw new VmStateError(`VM '${handle.spec.name}' (pid ${handle.pid}) is not running`)
      }
      return vm
    },
  }
}

/** The fake VM; `writeMemory`, `crash` and `uptimeMs` are test hooks beyond the Vm interface. */
export class FakeVm extends VmEmitter implements Vm {
  readonly consolePath = undefined
  readonly netSocket = undefined
  private readonly console: string[] = []
  private exitInfo: VmExitInfo | undefined
  private resolveExited!: (e: VmExitInfo) => void
  private readonly exited = new Promise<VmExitInfo>((r) => {
    this.resolveExited = r
  })
  private uptimeBase = 0
  private runningSince: number | undefined

  constructor(
    readonly spec: VmSpec,
    readonly memory: MemoryResource,
    private readonly dir: string | undefined,
    readonly pid: number,
    private _status: VmStatus,
  ) {
    super()
    if (_status === 'running') this.runningSince = Date.now()
    this.console.push(`fake guest ${spec.name} booting`)
  }

  status(): VmStatus {
    return this._status
  }

  /** Guest uptime in ms: advances only while running. */
  uptimeMs(): number {
    return this.uptimeBase + (this.runningSince === undefined ? 0 : Date.now() - this.runningSince)
  }

  /** "The guest writes memory": writes into the RAM file. */
  async writeMemory(offset: number, data: Uint8Array): Promise<void> {
    if (offset < 0 || offset + data.length > this.memory.size) throw new RangeError('write outside guest RAM')
    const fh = await open(this.memory.path, 'r+')
    try {
      await fh.write(data, 0, data.length, offset)
    } finally {
      await fh.close()
    }
  }

  /** Simulates the hypervisor dying with this exit status and console output. */
  async crash(code = 1, lines: string[] = ['fake: simulated crash']): Promise<void> {
    this.console.push(...lines)
    await this.end({ code, signal: null, lastLines: this.console.slice(-20) }, false)
  }

  private requireLive(what: string): void {
    if (this.exitInfo !== undefined) {
      throw this._status === 'stopped'
        ? new VmStateError(`VM '${this.spec.name}' is stopped (${what})`)
        : new VmExitedError(`VM '${this.spec.name}' (${what})`, this.exitInfo)
    }
  }

  private setRunning(running: boolean): void {
    if (running && this.runningSince === undefined) this.runningSince = Date.now()
    if (!running && this.runningSince !== undefined) {
      this.uptimeBase += Date.now() - this.runningSince
      this.runningSince = undefined
    }
  }

  async pause(signal?: AbortSignal): Promise<void> {
    throwIfAborted(signal)
    this.requireLive('pause')
    if (this._status === 'paused') return
    if (this._status === 'incoming')
      throw new VmStateError(`VM '${this.spec.name}' is waiting for state; cannot pause`)
    this.setRunning(false)
    this._status = 'paused'
    this.fire('paused', { at: Date.now() })
  }

  async resume(signal?: AbortSignal): Promise<void> {
    throwIfAborted(signal)
    this.requireLive('resume')
    if (this._status === 'running') return
    if (this._status === 'incoming')
      throw new VmStateError(`VM '${this.spec.name}' has no state yet: loadState() first`)
    this.setRunning(true)
    this._status = 'running'
    this.fire('resumed', { at: Date.now() })
  }

  async stop(): Promise<void> {
    if (this.exitInfo !== undefined) return
    await this.end(
      { code: 0, signal: null, reason: 'host-qmp-quit', lastLines: this.console.slice(-20) },
      true,
    )
  }

  private async end(info: VmExitInfo, stopped: boolean): Promise<void> {
    if (this.exitInfo !== undefined) return
    this.setRunning(false)
    this.exitInfo = info
    this._status = stopped ? 'stopped' : 'exited'
    live.delete(this.pid)
    await rm(this.memory.path, { force: true })
    if (this.dir !== undefined) await rm(this.dir, { recursive: true, force: true })
    this.resolveExited(info)
    if (stopped) this.fire('stopped', { at: Date.now() })
    else this.fire('exited', { ...info, at: Date.now() })
  }

  async saveState(signal?: AbortSignal): Promise<Uint8Array> {
    this.requireLive('saveState')
    if (this._status === 'incoming') throw new VmStateError(`VM '${this.spec.name}' has no state to save yet`)
    await this.pause(signal)
    return this.encodeState()
  }

  async snapshotState(signal?: AbortSignal): Promise<Uint8Array> {
    throwIfAborted(signal)
    this.requireLive('snapshotState')
    if (this._status !== 'running')
      throw new VmStateError(
        `VM '${this.spec.name}' is ${this._status}: a snapshot is taken from a running guest`,
      )
    return this.encodeState()
  }

  private encodeState(): Uint8Array {
    const state: FakeState = {
      fake: 1,
      name: this.spec.name,
      mac: this.spec.mac,
      memoryMiB: this.spec.memoryMiB,
      uptimeMs: this.uptimeMs(),
    }
    return Buffer.from(JSON.stringify(state))
  }

  async loadState(bytes: Uint8Array, signal?: AbortSignal): Promise<void> {
    throwIfAborted(signal)
    this.requireLive('loadState')
    if (this._status !== 'incoming')
      throw new VmStateError(`VM '${this.spec.name}' was not started to receive state (incoming)`)
    let state: FakeState
    try {
      state = JSON.parse(Buffer.from(bytes).toString('utf8')) as FakeState
      if (state.fake !== 1 || state.memoryMiB !== this.spec.memoryMiB || typeof state.uptimeMs !== 'number') {
        throw new Error('not a fake device state for this spec')
      }
    } catch (err) {
      // Like QEMU 7.2, a destination fed a bad stream does not survive it.
      const info: VmExitInfo = { code: 1, signal: null, lastLines: ['fake: load of migration failed'] }
      await this.end(info, false)
      throw new VmMigrationError(
        `loading device state into '${this.spec.name}' failed: ${(err as Error).message}`,
        {
          cause: new VmExitedError(`VM '${this.spec.name}'`, info),
        },
      )
    }
    this.uptimeBase = state.uptimeMs
    this._status = 'paused'
  }

  dirtyTracker(options: DirtyTrackerOptions = {}): DirtyTracker {
    return new CompareDirtyTracker(this.memory.path, this.memory.size, options.chunkSize)
  }

  async consoleTail(n = 20): Promise<string[]> {
    return this.console.slice(-n)
  }

  wait(): Promise<VmExitInfo> {
    return this.exited
  }

  async detach(): Promise<void> {
    // A fake VM cannot outlive this process; it stays in the registry so adopt() finds it again.
  }
}
