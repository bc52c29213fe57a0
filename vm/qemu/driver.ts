/**
 * The QEMU VM driver: starts a guest from its spec (resolving image references, the writable disk,
 * the command line of args.ts) or adopts one a previous agent left running. The running guest is
 * QemuVm (vm.ts).
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { closeSync, constants, openSync } from 'node:fs'
import { access, mkdir, mkdtemp, readFile, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'
import { AbortError, throwIfAborted } from '../../src/base/errors.ts'
import { processAlive } from '../../src/base/process.ts'
import { retainVolume } from '../disk/previous.ts'
import { GiB, prepareVolume, removeVolume } from '../disk/volume.ts'
import type { StartOptions, Vm, VmDriver, VmHandle } from '../driver/interfaces.ts'
import { VmExitedError, VmSpecError, VmStartError, VmStateError } from '../errors.ts'
import { parseImageRef, type VmSpec } from '../spec.ts'
import { buildQemuArgs, type NetBackend } from './args.ts'
import { type Paths, QemuVm } from './vm.ts'

const MiB = 1024 * 1024

export interface QemuDriverOptions {
  /** Default `qemu-system-x86_64` from PATH. */
  qemuBinary?: string
  /** Where RAM files go. Default $MESH_RAM_DIR, else /dev/shm/mesh (tmpfs: RAM never touches a disk). */
  ramDir?: string
  /** Where each VM's sockets and console log go (keep it short: unix socket paths max 107 bytes). */
  runDir?: string
  accel?: 'kvm' | 'tcg'
  /** How long QEMU may take to open its QMP socket. Default 60 s (TCG on a busy box is slow). */
  startTimeoutMs?: number
  /** Default timeout for QMP commands and for migrations. Default 60 s. */
  commandTimeoutMs?: number
  /** Where VMs' writable disks (qcow2 overlays) go. Default `<runDir>/disks`; agents use STATE/disks. */
  diskDir?: string
  /**
   * Turns an `image:NAME[:TAG]` reference of a spec (kernel, initrd, volume base) into a local file;
   * the agent materialises it from the chunk layer. Without it, image references are an error.
   */
  resolveImage?: (ref: string, signal?: AbortSignal) => Promise<string>
}

async function checkReadable(field: string, path: string | undefined): Promise<void> {
  if (path === undefined) return
  if (parseImageRef(path) !== undefined) {
    throw new VmSpecError(
      `spec.${field}`,
      `image '${path}' must be resolved to a file (chunk layer) before start`,
    )
  }
  try {
    await access(path, constants.R_OK)
  } catch (err) {
    throw new VmStartError(`spec.${field}: cannot read '${path}': ${(err as NodeJS.ErrnoException).code}`, {
      cause: err,
    })
  }
}

/** Creates the QEMU driver. */
export function createQemuDriver(options: QemuDriverOptions = {}): VmDriver {
  return new QemuDriver(options)
}

class QemuDriver implements VmDriver {
  readonly name = 'qemu'
  private readonly qemu: string
  private readonly ramDir: string
  private readonly runDir: string
  private readonly diskDir: string
  private readonly startTimeoutMs: number
  private readonly commandTimeoutMs: number

  constructor(private readonly options: QemuDriverOptions) {
    this.qemu = options.qemuBinary ?? 'qemu-system-x86_64'
    this.ramDir = options.ramDir ?? process.env.MESH_RAM_DIR ?? '/dev/shm/mesh'
    this.runDir = options.runDir ?? join(tmpdir(), `mesh-vm-${process.getuid?.() ?? 0}`)
    this.diskDir = options.diskDir ?? join(this.runDir, 'disks')
    this.startTimeoutMs = options.startTimeoutMs ?? 60_000
    this.commandTimeoutMs = options.commandTimeoutMs ?? 60_000
  }

  async start(spec: VmSpec, opts: StartOptions = {}): Promise<Vm> {
    const signal = opts.signal
    throwIfAborted(signal)
    const kernel = await this.resolve('kernel', spec.kernel, signal)
    const initrd = await this.resolve('initrd', spec.initrd, signal)
    const base = await this.resolve('volume.base', spec.volume?.base, signal)
    await checkReadable('kernel', kernel)
    await checkReadable('initrd', initrd)
    await checkReadable('disk', spec.disk)
    await checkReadable('volume.base', base)
    const size = spec.memoryMiB * MiB
    if (opts.memoryPath !== undefined) {
      const st = await stat(opts.memoryPath).catch((err: unknown) => {
        throw new VmStartError(`memory file '${opts.memoryPath}' is not there`, { cause: err })
      })
      if (st.size !== size) {
        throw new VmStartError(
          `memory file '${opts.memoryPath}' has ${st.size} bytes, spec.memoryMiB=${spec.memoryMiB} needs ${size}`,
        )
      }
    }
    await mkdir(this.runDir, { recursive: true, mode: 0o700 })
    await mkdir(this.ramDir, { recursive: true, mode: 0o700 })
    const dir = await mkdtemp(join(this.runDir, `${spec.name.slice(0, 24)}.`))
    const paths: Paths = {
      dir,
      qmp: join(dir, 'qmp.sock'),
      console: join(dir, 'console.log'),
      stderr: join(dir, 'stderr.log'),
      net: opts.testNet === undefined ? join(dir, 'net.sock') : '',
      volume: '',
    }
    let createdVolume = false
    let seeded: string | undefined
    if (spec.volume !== undefined && base !== undefined) {
      try {
        const v = await prepareVolume({
          dir: this.diskDir,
          vm: spec.name,
          base,
          ...(spec.volume.sizeGiB === undefined ? {} : { sizeBytes: spec.volume.sizeGiB * GiB }),
          incoming: opts.incoming === true,
          ...(opts.volumeSeed === undefined ? {} : { seed: opts.volumeSeed }),
          ...(signal ? { signal } : {}),
        })
        paths.volume = v.path
        createdVolume = v.created
        if (v.seeded) seeded = opts.volumeSeed
      } catch (err) {
        await rm(dir, { recursive: true, force: true })
        throw err
      }
    }
    const ramPath = opts.memoryPath ?? join(this.ramDir, `${basename(dir)}.ram`)
    const net: NetBackend =
      opts.testNet === undefined ? { type: 'stream' } : { type: 'user', hostfwd: opts.testNet.hostfwd }
    const args = buildQemuArgs(
      spec,
      {
        ramPath,
        qmpPath: paths.qmp,
        consolePath: paths.console,
        netPath: paths.net,
        ...(paths.volume === '' ? {} : { volumePath: paths.volume }),
        ...(kernel !== spec.kernel ? { kernelPath: kernel } : {}),
        ...(initrd !== spec.initrd && initrd !== undefined ? { initrdPath: initrd } : {}),
      },
      {
        ...(this.options.accel === undefined ? {} : { accel: this.options.accel }),
        incoming: opts.incoming === true,
        net,
      },
    )

    const errFd = openSync(paths.stderr, 'w')
    let child: ChildProcess
    try {
      // Detached: its own process group, so a Ctrl-C to the agent does not kill the guests, and the VM
      // can outlive the agent (which re-adopts it through its QMP socket).
      child = spawn(this.qemu, args, { detached: true, stdio: ['ignore', 'ignore', errFd] })
    } finally {
      closeSync(errFd)
    }
    const vm = new QemuVm(spec, { path: ramPath, size }, paths, this.commandTimeoutMs, child)
    vm.volumeSeed = seeded
    try {
      await vm.connect(this.startTimeoutMs, signal)
      await vm.qmpExecute('migrate-set-capabilities', {
        capabilities: [
          // RAM lives in the shared file that the chunk layer moves: keep it out of the device state.
          { capability: 'x-ignore-shared', state: true },
          { capability: 'events', state: true },
        ],
      })
      if (opts.incoming === true) vm.setStatus('incoming')
      else if (opts.paused === true) vm.setStatus('paused')
      else {
        vm.setStatus('paused')
        await vm.resume(signal)
      }
      return vm
    } catch (err) {
      // The VM never became the caller's: remove everything, including a RAM file we created (a file
      // the caller passed in stays theirs).
      await vm.destroy(opts.memoryPath === undefined)
      // A disk seeded from the one the VM left here stays that (record-less: hash-verified fills only).
      // Neither step may replace the start's own error, which is what the caller must see.
      if (seeded !== undefined)
        await retainVolume(paths.volume, this.diskDir, spec.name).catch(() =>
          removeVolume(paths.volume).catch(() => {}),
        )
      else if (createdVolume) await removeVolume(paths.volume).catch(() => {})
      if (err instanceof VmExitedError || err instanceof AbortError) throw err
      throw err instanceof VmStartError
        ? err
        : new VmStartError(`starting VM '${spec.name}' failed: ${(err as Error).message}`, { cause: err })
    }
  }

  /** A spec field's local file: image references through resolveImage, paths as they are. */
  private async resolve(
    field: string,
    value: string | undefined,
    signal: AbortSignal | undefined,
  ): Promise<string | undefined> {
    if (value === undefined || parseImageRef(value) === undefined) return value
    if (this.options.resolveImage === undefined)
      throw new VmSpecError(
        `spec.${field}`,
        `image '${value}' must be resolved to a file (chunk layer) before start`,
      )
    return this.options.resolveImage(value, signal)
  }

  handle(vm: Vm): VmHandle {
    if (!(vm instanceof QemuVm)) throw new TypeError('not a QEMU VM')
    return vm.toHandle()
  }

  async adopt(handle: VmHandle, signal?: AbortSignal): Promise<Vm> {
    const p = handle.paths
    const paths: Paths = {
      dir: p.dir ?? '',
      qmp: p.qmp ?? '',
      console: p.console ?? '',
      stderr: p.stderr ?? '',
      net: p.net ?? '',
      volume: p.volume ?? '',
    }
    if (!processAlive(handle.pid))
      throw new VmStateError(`VM '${handle.spec.name}' (pid ${handle.pid}) is not running`)
    // A recycled pid would be another program: the RAM file path on its command line proves it is ours.
    const cmdline = await readFile(`/proc/${handle.pid}/cmdline`, 'utf8').catch(() => '')
    if (!cmdline.includes(handle.memoryPath)) {
      throw new VmStateError(`VM '${handle.spec.name}': pid ${handle.pid} is not its QEMU any more`)
    }
    const vm = new QemuVm(
      handle.spec,
      { path: handle.memoryPath, size: handle.spec.memoryMiB * MiB },
      paths,
      this.commandTimeoutMs,
      undefined,
      handle.pid,
    )
    await vm.connect(10_000, signal)
    const st = await vm.qmpExecute<{ status: string; running: boolean }>('query-status')
    vm.setStatus(st.status === 'inmigrate' ? 'incoming' : st.running ? 'running' : 'paused')
    return vm
  }
}
