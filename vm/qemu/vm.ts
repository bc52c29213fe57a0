/**
 * One QEMU guest as a Vm (moved out of driver.ts): its process and QMP session, pause/resume/stop,
 * the device state's save and load (QEMU's migration to and from a file descriptor), and the trackers
 * and disk parts a move uses. driver.ts starts or adopts the process and hands it here.
 *
 * Why one file of ~610 lines (#18: files over ~600 lines say why): it is one class implementing the Vm
 * contract (vm/driver/interfaces.ts) over one QMP session and one process whose status every method
 * reads; the disk parts it hands out (trackers, the standby reader, the writer, the previous disk) live
 * in vm/disk/ already, and what is left here is the glue that owns the QMP session for them.
 */
import type { ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import { createConnection, createServer } from 'node:net'
import { dirname, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError, throwIfAborted } from '../../src/base/errors.ts'
import { processAlive } from '../../src/base/process.ts'
import { createDirtyTracker } from '../dirty/index.ts'
import { openPreviousDisk, type PreviousDisk, retainVolume } from '../disk/previous.ts'
import {
  createDiskArbiter,
  createStandbyDiskReader,
  type DiskArbiter,
  type StandbyDiskReader,
} from '../disk/standby.ts'
import { arrivalOf, createDiskTracker, type DiskTracker, markArrival } from '../disk/tracker.ts'
import { removeVolume } from '../disk/volume.ts'
import { type DiskWriter, openDiskWriter } from '../disk/writer.ts'
import { tailLines, VmEmitter } from '../driver/base.ts'
import type {
  DirtyTracker,
  DirtyTrackerOptions,
  MemoryResource,
  Vm,
  VmHandle,
  VmStatus,
} from '../driver/interfaces.ts'
import { VmExitedError, type VmExitInfo, VmMigrationError, VmStartError, VmStateError } from '../errors.ts'
import type { VmSpec } from '../spec.ts'
import { VOLUME_NODE } from './args.ts'
import { QmpClient, type QmpEvent } from './qmp.ts'

/** Where a VM's files are (driver.ts makes them). */
export interface Paths {
  dir: string
  qmp: string
  console: string
  stderr: string
  net: string
  /** The writable disk ('' when the VM has none). */
  volume: string
}

export class QemuVm extends VmEmitter implements Vm {
  readonly pid: number | undefined
  readonly consolePath: string
  readonly netSocket: string | undefined
  readonly volumePath: string | undefined
  volumeSeed: string | undefined
  /** stop() keeps the disk as the VM's previous disk here (a move out), see retainVolumeOnStop(). */
  private retainVolume = false
  /** The move out that retainVolumeOnStop() named. */
  private retainSince: string | undefined
  private readonly diskArbiter: DiskArbiter = createDiskArbiter()
  private qmp: QmpClient | undefined
  private _status: VmStatus = 'paused'
  private exitInfo: VmExitInfo | undefined
  private readonly exited: Promise<VmExitInfo>
  private resolveExited!: (e: VmExitInfo) => void
  private stopping = false
  private detached = false
  private shutdownReason: string | undefined
  private watchTimer: NodeJS.Timeout | undefined
  /** Set while a dirty tracker holds the guest still: that stop/cont is not a pause for listeners. */
  private frozen = false
  /** An in-flight pause (from pause() or saveState()). */
  private pausing: Promise<void> | undefined
  /** The device state save in flight (saveState()): resume() waits for it. */
  private saving: Promise<Uint8Array> | undefined

  constructor(
    readonly spec: VmSpec,
    readonly memory: MemoryResource,
    private readonly paths: Paths,
    private readonly timeoutMs: number,
    private readonly child: ChildProcess | undefined,
    pid?: number,
  ) {
    super()
    this.pid = child?.pid ?? pid
    this.consolePath = paths.console
    this.netSocket = paths.net === '' ? undefined : paths.net
    this.volumePath = paths.volume === '' ? undefined : paths.volume
    this.exited = new Promise((resolve) => {
      this.resolveExited = resolve
    })
    if (child !== undefined) {
      child.on('exit', (code, sig) => void this.gone(code, sig))
      child.on('error', (err) => {
        // spawn failure (binary missing): no exit event follows on every Node version, so end here.
        void this.gone(null, null, `cannot run QEMU: ${err.message}`)
      })
    }
  }

  status(): VmStatus {
    return this._status
  }

  setStatus(s: VmStatus): void {
    this._status = s
  }

  toHandle(): VmHandle {
    if (this.pid === undefined) throw new VmStateError(`VM '${this.spec.name}' has no process`)
    return {
      spec: this.spec,
      pid: this.pid,
      memoryPath: this.memory.path,
      paths: { ...this.paths },
    }
  }

  /** Waits for the QMP socket and connects; fails early when QEMU exits. */
  async connect(timeoutMs: number, signal: AbortSignal | undefined): Promise<void> {
    const deadline = Date.now() + timeoutMs
    let lastErr: unknown
    while (Date.now() < deadline) {
      throwIfAborted(signal)
      if (this.exitInfo !== undefined)
        throw new VmExitedError(`starting VM '${this.spec.name}'`, this.exitInfo)
      if (existsSync(this.paths.qmp)) {
        try {
          const left = Math.max(deadline - Date.now(), 1000)
          this.qmp = await QmpClient.connect(this.paths.qmp, {
            timeoutMs: Math.min(left, this.timeoutMs),
            ...(signal ? { signal } : {}),
          })
          this.qmp.on('event', (e) => this.onEvent(e))
          this.qmp.on('close', () => this.onQmpClose())
          return
        } catch (err) {
          if (err instanceof AbortError) throw err
          lastErr = err
        }
      }
      await sleep(50)
    }
    if (this.exitInfo !== undefined) throw new VmExitedError(`starting VM '${this.spec.name}'`, this.exitInfo)
    throw new VmStartError(`QEMU for '${this.spec.name}' did not answer on QMP within ${timeoutMs} ms`, {
      cause: lastErr,
    })
  }

  qmpExecute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    signal?: AbortSignal,
    timeoutMs?: number,
  ): Promise<T> {
    if (this.qmp === undefined || this.exitInfo !== undefined) {
      return Promise.reject(this.goneError(command))
    }
    return this.qmp.execute<T>(command, args, {
      timeoutMs: timeoutMs ?? this.timeoutMs,
      ...(signal ? { signal } : {}),
    })
  }

  private goneError(what: string): Error {
    if (this.exitInfo !== undefined) {
      return this.stopping
        ? new VmStateError(`VM '${this.spec.name}' is stopped (${what})`)
        : new VmExitedError(`VM '${this.spec.name}' (${what})`, this.exitInfo)
    }
    return new VmStateError(`VM '${this.spec.name}' is not connected (${what})`)
  }

  private onEvent(e: QmpEvent): void {
    // A dirty tracker's brief stop/cont is not a pause as far as the VM's users are concerned.
    if (e.event === 'STOP' && !this.frozen) this.markPaused()
    else if (e.event === 'RESUME' && !this.frozen) this.markRunning()
    else if (e.event === 'SHUTDOWN') {
      this.shutdownReason = typeof e.data.reason === 'string' ? e.data.reason : undefined
    }
  }

  private markPaused(): void {
    if (this._status !== 'running') return
    this._status = 'paused'
    this.fire('paused', { at: Date.now() })
  }

  private markRunning(): void {
    this.retainVolume = false
    if (this._status === 'running') return
    this._status = 'running'
    this.fire('resumed', { at: Date.now() })
  }

  /** QMP closing means QEMU is going away; for an adopted VM (not our child) watch its pid. */
  private onQmpClose(): void {
    if (this.detached || this.child !== undefined || this.pid === undefined) return
    const pid = this.pid
    const poll = () => {
      if (this.exitInfo !== undefined) return
      if (!processAlive(pid)) void this.gone(null, null)
      else this.watchTimer = setTimeout(poll, 100).unref()
    }
    poll()
  }

  /**
   * The process ended: record why, clean up its files, tell listeners. Once: every caller (the child's
   * exit and error events, the adopted VM's pid watch, stop()'s own poll) gets the same promise, so none
   * returns before the files are gone. (Two callers used to race: the second saw exitInfo set by the
   * first and returned while the first was still removing the RAM file, so stop() of an adopted VM could
   * return with it still there — the qemu compliance test failed so in a nice'd npm test.)
   */
  private gone(code: number | null, sig: NodeJS.Signals | null, extra?: string): Promise<void> {
    if (this.detached) return Promise.resolve()
    this.ending ??= this.end(code, sig, extra)
    return this.ending
  }

  private ending: Promise<void> | undefined

  private async end(code: number | null, sig: NodeJS.Signals | null, extra?: string): Promise<void> {
    if (this.exitInfo !== undefined) return
    const lastLines = await this.consoleTail(20)
    if (extra !== undefined) lastLines.push(extra)
    const info: VmExitInfo = { code, signal: sig, lastLines }
    if (this.shutdownReason !== undefined) info.reason = this.shutdownReason
    if (this.exitInfo !== undefined) return
    this.exitInfo = info
    this.qmp?.close()
    if (this.watchTimer !== undefined) clearTimeout(this.watchTimer)
    const wasStopping = this.stopping
    this._status = wasStopping ? 'stopped' : 'exited'
    await this.removeFiles(true)
    this.resolveExited(info)
    if (wasStopping) this.fire('stopped', { at: Date.now() })
    else this.fire('exited', { ...info, at: Date.now() })
  }

  private async removeFiles(ram: boolean): Promise<void> {
    await rm(this.paths.dir, { recursive: true, force: true }).catch(() => {})
    if (ram) await rm(this.memory.path, { force: true }).catch(() => {})
  }

  private requireLive(what: string): void {
    if (this._status === 'stopped' || this._status === 'exited' || this.exitInfo !== undefined) {
      throw this.goneError(what)
    }
  }

  async pause(signal?: AbortSignal): Promise<void> {
    this.requireLive('pause')
    if (this._status === 'paused') return
    if (this._status === 'incoming')
      throw new VmStateError(`VM '${this.spec.name}' is waiting for state; cannot pause`)
    // Remembered so that a dirty round started meanwhile waits for the guest to be still (see below).
    const p = this.qmpExecute('stop', undefined, signal).then(() => this.markPaused())
    this.pausing = p
    try {
      await p
    } finally {
      if (this.pausing === p) this.pausing = undefined
    }
  }

  async resume(signal?: AbortSignal): Promise<void> {
    this.requireLive('resume')
    if (this._status === 'running') return
    if (this._status === 'incoming')
      throw new VmStateError(`VM '${this.spec.name}' has no state yet: loadState() first`)
    // QEMU ends a save in `postmigrate` (stopped) even when `cont` came while it ran, and refuses
    // `cont` while it finishes one: resume once the save in flight is over (its caller sees its error).
    if (this.saving !== undefined)
      await this.saving.then(
        () => {},
        () => {},
      )
    await this.qmpExecute('cont', undefined, signal)
    this.markRunning()
  }

  async stop(signal?: AbortSignal): Promise<void> {
    // An explicit stop ends the VM for good: its disk goes too (a crash keeps it, see gone()).
    try {
      await this.stopProcess(signal)
    } finally {
      if (this.volumePath !== undefined && (this.exitInfo !== undefined || this.detached)) {
        if (this.retainVolume)
          await retainVolume(
            this.volumePath,
            dirname(this.volumePath),
            this.spec.name,
            this.retainSince,
          ).catch(() => removeVolume(this.volumePath!))
        else await removeVolume(this.volumePath).catch(() => {})
      }
    }
  }

  private async stopProcess(signal?: AbortSignal): Promise<void> {
    if (this.exitInfo !== undefined || this.detached) {
      await this.removeFiles(true)
      return
    }
    this.stopping = true
    // Graceful first: QMP quit lets QEMU close its files; then signals for a QEMU that hangs.
    if (this.qmp !== undefined && !this.qmp.isClosed) {
      await this.qmp.execute('quit', undefined, { timeoutMs: 5000 }).catch(() => {})
    }
    if (await this.waitGone(10_000, signal)) return
    this.signal('SIGTERM')
    if (await this.waitGone(5_000, signal)) return
    this.signal('SIGKILL')
    if (await this.waitGone(10_000, signal)) return
    throw new VmStateError(`VM '${this.spec.name}' (pid ${this.pid}) did not die after SIGKILL`)
  }

  private signal(sig: NodeJS.Signals): void {
    if (this.pid === undefined) return
    try {
      process.kill(this.pid, sig)
    } catch {
      // already gone
    }
  }

  /** True once the process is gone (and cleaned up) within `ms`. */
  private async waitGone(ms: number, signal?: AbortSignal): Promise<boolean> {
    if (this.exitInfo !== undefined) return true
    if (this.child === undefined && this.pid !== undefined) {
      // Not our child: no exit event, poll.
      const deadline = Date.now() + ms
      while (Date.now() < deadline) {
        throwIfAborted(signal)
        if (!processAlive(this.pid)) {
          await this.gone(null, null)
          return true
        }
        await sleep(50)
      }
      return false
    }
    const timeout = sleep(ms, false, signal ? { signal } : {}).catch(() => false)
    const r = await Promise.race([this.exited.then(() => true), timeout])
    throwIfAborted(signal)
    return r === true
  }

  /** Kills the process (if any) and removes files; used when start fails. */
  async destroy(removeRam: boolean): Promise<void> {
    this.stopping = true
    this.signal('SIGKILL')
    if (
      this.child !== undefined &&
      this.child.exitCode === null &&
      this.child.signalCode === null &&
      this.child.pid !== undefined
    ) {
      await Promise.race([this.exited, sleep(10_000)])
    }
    this.qmp?.close()
    await this.removeFiles(removeRam)
  }

  async saveState(signal?: AbortSignal): Promise<Uint8Array> {
    this.requireLive('saveState')
    if (this._status === 'incoming') throw new VmStateError(`VM '${this.spec.name}' has no state to save yet`)
    await this.pause(signal)
    const p = this.migrateOut(signal)
    this.saving = p
    try {
      const state = await p
      // QEMU is now in `postmigrate`: paused; `cont` resumes it (rollback).
      this._status = 'paused'
      return state
    } finally {
      if (this.saving === p) this.saving = undefined
    }
  }

  async snapshotState(signal?: AbortSignal): Promise<Uint8Array> {
    this.requireLive('snapshotState')
    if (this._status !== 'running')
      throw new VmStateError(
        `VM '${this.spec.name}' is ${this._status}: a snapshot is taken from a running guest`,
      )
    // Frozen: the stop/cont around the save is not a pause to the VM's users (no events, no hold).
    this.frozen = true
    try {
      await this.qmpExecute('stop', undefined, signal)
      try {
        return await this.migrateOut(signal)
      } finally {
        // From `postmigrate`, `cont` resumes the guest, as after a rolled-back move.
        if (this._status === 'running' && this.exitInfo === undefined) await this.qmpExecute('cont')
      }
    } finally {
      this.frozen = false
    }
  }

  /** Runs a QEMU migration of the device state (RAM is shared, not sent) into a socket; returns it. */
  private async migrateOut(signal?: AbortSignal): Promise<Uint8Array> {
    const sock = join(this.paths.dir, `save-${Date.now()}.sock`)
    const parts: Buffer[] = []
    const server = createServer()
    const received = new Promise<void>((resolve, reject) => {
      server.once('connection', (c) => {
        server.close()
        c.on('data', (b: Buffer) => parts.push(b))
        c.on('end', () => resolve())
        c.on('error', reject)
      })
    })
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(sock, () => resolve())
    })
    const abortNow = () => void this.qmpExecute('migrate_cancel').catch(() => {})
    const offAbort = onAbort(signal, abortNow)
    try {
      const finished = this.waitMigration(signal)
      await this.qmpExecute('migrate', { uri: `unix:${sock}` }, signal)
      await finished
      await Promise.race([
        received,
        sleep(this.timeoutMs).then(() =>
          Promise.reject(new VmMigrationError('device state stream did not end')),
        ),
      ])
    } catch (err) {
      if (err instanceof AbortError || err instanceof VmMigrationError || err instanceof VmExitedError)
        throw err
      throw new VmMigrationError(
        `saving device state of '${this.spec.name}' failed: ${(err as Error).message}`,
        { cause: err },
      )
    } finally {
      offAbort()
      server.close()
      await rm(sock, { force: true })
    }
    return Buffer.concat(parts)
  }

  /** Resolves on MIGRATION completed; rejects on failed/cancelled, QEMU exit, timeout or abort. */
  private async waitMigration(signal?: AbortSignal): Promise<void> {
    if (this.qmp === undefined) throw this.goneError('migration')
    const terminal = new Set(['completed', 'failed', 'cancelled'])
    let ev: QmpEvent
    try {
      ev = await this.qmp.waitEvent('MIGRATION', {
        timeoutMs: this.timeoutMs,
        match: (e) => terminal.has(String(e.data.status)),
        ...(signal ? { signal } : {}),
      })
    } catch (err) {
      if (err instanceof AbortError) throw err
      // QMP closed: QEMU died (an incoming QEMU 7.2 exits when the stream is bad). Report its exit.
      const info = await Promise.race([this.exited, sleep(5000).then(() => undefined)])
      if (info !== undefined)
        throw new VmMigrationError(`migration of '${this.spec.name}' failed`, {
          cause: new VmExitedError(`VM '${this.spec.name}'`, info),
        })
      throw new VmMigrationError(`migration of '${this.spec.name}' failed: ${(err as Error).message}`, {
        cause: err,
      })
    }
    if (ev.data.status !== 'completed') {
      const q = await this.qmpExecute<{ 'error-desc'?: string }>('query-migrate').catch(
        () => ({}) as { 'error-desc'?: string },
      )
      throw new VmMigrationError(
        `migration of '${this.spec.name}' ${String(ev.data.status)}: ${q['error-desc'] ?? 'no reason given'}`,
      )
    }
  }

  async loadState(state: Uint8Array, signal?: AbortSignal): Promise<void> {
    this.requireLive('loadState')
    if (this._status !== 'incoming')
      throw new VmStateError(`VM '${this.spec.name}' was not started to receive state (incoming)`)
    const sock = join(this.paths.dir, 'load.sock')
    const finished = this.waitMigration(signal)
    finished.catch(() => {}) // observed below; avoid an unhandled rejection if migrate-incoming fails first
    try {
      await this.qmpExecute('migrate-incoming', { uri: `unix:${sock}` }, signal)
      await new Promise<void>((resolve, reject) => {
        const c = createConnection({ path: sock })
        c.on('error', reject)
        c.on('connect', () => c.end(state, () => resolve()))
      })
      await finished
    } catch (err) {
      if (err instanceof AbortError || err instanceof VmMigrationError) throw err
      throw new VmMigrationError(
        `loading device state into '${this.spec.name}' failed: ${(err as Error).message}`,
        { cause: err },
      )
    } finally {
      await rm(sock, { force: true })
    }
    this._status = 'paused'
  }

  dirtyTracker(options: DirtyTrackerOptions = {}): DirtyTracker {
    const inner = createDirtyTracker(
      {
        path: this.memory.path,
        size: this.memory.size,
        ...(this.pid === undefined ? {} : { pid: this.pid }),
        freeze: async <T>(fn: () => Promise<T>): Promise<T> => {
          if (this._status !== 'running') return fn()
          this.frozen = true
          try {
            await this.qmpExecute('stop')
            try {
              return await fn()
            } finally {
              // pause()/saveState() during the freeze wins: the guest then stays stopped.
              if (this._status === 'running') await this.qmpExecute('cont')
            }
          } finally {
            this.frozen = false
          }
        },
      },
      options.chunkSize,
      options.method,
    )
    // A round started while a pause is in flight (e.g. `Promise.all([saveState(), collect()])`) waits
    // for the guest to be still: otherwise writes between its scan and the pause would be lost.
    return {
      method: inner.method,
      chunkSize: inner.chunkSize,
      start: (signal) => inner.start(signal),
      collect: async (signal) => {
        await this.pausing?.catch(() => {})
        return inner.collect(signal)
      },
      close: () => inner.close(),
    }
  }

  diskTracker(options: { chunkSize?: number } = {}): DiskTracker | undefined {
    if (this.volumePath === undefined) return undefined
    const t = createDiskTracker({
      qmp: (command, args) => this.qmpExecute(command, args),
      node: VOLUME_NODE,
      dir: this.paths.dir,
      ...(options.chunkSize === undefined ? {} : { chunkSize: options.chunkSize }),
    })
    // A move takes QEMU's one NBD server from a warm standby's pass (vm/disk/standby.ts).
    let release: (() => void) | undefined
    const arbiter = this.diskArbiter
    return Object.assign(Object.create(t) as DiskTracker, {
      async open() {
        release ??= await arbiter.exclusive()
        try {
          await t.open()
        } catch (err) {
          release()
          release = undefined
          throw err
        }
      },
      async close() {
        try {
          await t.close()
        } finally {
          release?.()
          release = undefined
        }
      },
    })
  }

  /** What a warm standby reads the writable disk with (vm/disk/standby.ts). */
  standbyDisk(chunkSize: number): StandbyDiskReader | undefined {
    if (this.volumePath === undefined) return undefined
    return createStandbyDiskReader({
      qmp: (command, args) => this.qmpExecute(command, args),
      node: VOLUME_NODE,
      dir: this.paths.dir,
      arbiter: this.diskArbiter,
      chunkSize,
    })
  }

  retainVolumeOnStop(since?: string): void {
    if (this.volumePath !== undefined && this._status !== 'running') {
      this.retainVolume = true
      this.retainSince = since
    }
  }

  diskArrival(): Promise<string | undefined> {
    if (this.volumePath === undefined) return Promise.resolve(undefined)
    return arrivalOf((command, args) => this.qmpExecute(command, args), VOLUME_NODE)
  }

  markDiskArrival(sid: string, chunkSize: number): Promise<void> {
    if (this.volumePath === undefined) return Promise.resolve()
    return markArrival((command, args) => this.qmpExecute(command, args), VOLUME_NODE, chunkSize, sid)
  }

  previousDisk(chunkSize: number): Promise<PreviousDisk | undefined> {
    if (this.volumePath === undefined) return Promise.resolve(undefined)
    return openPreviousDisk(dirname(this.volumePath), this.spec.name, chunkSize)
  }

  diskWriter(): Promise<DiskWriter> | undefined {
    if (this.volumePath === undefined) return undefined
    return openDiskWriter({
      qmp: (command, args) => this.qmpExecute(command, args),
      node: VOLUME_NODE,
      dir: this.paths.dir,
    })
  }

  async consoleTail(n = 20): Promise<string[]> {
    const [con, err] = await Promise.all([tailLines(this.paths.console, n), tailLines(this.paths.stderr, n)])
    return [...con, ...err].slice(-n)
  }

  wait(): Promise<VmExitInfo> {
    return this.exited
  }

  async detach(): Promise<void> {
    this.detached = true
    if (this.watchTimer !== undefined) clearTimeout(this.watchTimer)
    this.child?.removeAllListeners('exit')
    this.child?.unref()
    this.qmp?.close()
  }
}
