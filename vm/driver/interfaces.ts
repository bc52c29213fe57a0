/**
 * The VM runtime contract. Migration (and the agent) only see these types; the QEMU and fake drivers
 * implement them. Nothing here knows about the network: device state comes out as bytes, and guest RAM
 * is a plain file the chunk layer can read, hash and write.
 *
 * Migration recipe with these calls (RAM moves as chunks, not through QEMU):
 *   src = await driver.start(spec)                  // running
 *   tracker = src.dirtyTracker(); await tracker.start()
 *   ... copy src.memory.path chunks to the destination, then `await tracker.collect()` rounds ...
 *   dst = await driver.start(spec, { incoming: true, memoryPath: COPY })  // waits, paused
 *   state = await src.saveState()                   // src is now paused, RAM no longer changes
 *   ... send the last dirty chunks (tracker.collect()) into COPY, send `state` ...
 *   await dst.loadState(state); await dst.resume()   // guest continues on dst
 *   await src.stop()                                 // or src.resume() to roll back
 */

import type { PreviousDisk } from '../disk/previous.ts'
import type { StandbyDiskReader } from '../disk/standby.ts'
import type { DiskTracker } from '../disk/tracker.ts'
import type { DiskWriter } from '../disk/writer.ts'
import type { VmExitInfo } from '../errors.ts'
import type { VmSpec } from '../spec.ts'

export type { VmExitInfo } from '../errors.ts'
export type { VmSpec } from '../spec.ts'

/**
 * Where a VM is in its life:
 * - `incoming`: started to receive device state (loadState); the guest has not run here yet
 * - `running` / `paused`: guest CPUs run / are stopped (memory no longer changes while paused)
 * - `stopped`: we stopped it (stop()); `exited`: the process ended on its own or was killed
 */
export type VmStatus = 'incoming' | 'running' | 'paused' | 'stopped' | 'exited'

/** The guest RAM as a file (a shared mapping of the hypervisor): read it, chunk it, write a copy of it. */
export interface MemoryResource {
  path: string
  /** Bytes; equals spec.memoryMiB * 1 MiB. */
  size: number
}

export interface StartOptions {
  /**
   * Start waiting for device state instead of booting: the VM comes up `incoming`; call loadState()
   * then resume(). The RAM file must already hold the guest's memory (see `memoryPath`).
   */
  incoming?: boolean
  /**
   * Use this file as the guest RAM instead of a fresh one (the destination's copy of the source's RAM).
   * The VM owns it from now on: stop() deletes it. Without it, a new file is created under the driver's
   * RAM directory (and an existing file of that name is an error, not silently reused).
   */
  memoryPath?: string
  /** Start with CPUs stopped (status `paused`); resume() boots. Ignored when `incoming`. */
  paused?: boolean
  /**
   * Tests only: replace the guest NIC's backend by user-mode networking with these host port forwards,
   * so a test reaches guest services without the tunnel (the guest should use 10.0.2.15/24). Drivers
   * without networking ignore it.
   */
  testNet?: { hostfwd: Array<{ hostPort: number; guestPort: number }> }
  /**
   * Incoming only: the move that took this VM away from here last (its session id). When the disk it
   * left here then is still as it was (vm/disk/previous.ts), it becomes the incoming disk, and
   * Vm.volumeSeed says so; otherwise the disk starts empty on its base.
   */
  volumeSeed?: string
  signal?: AbortSignal
}

/** Dirty chunks since the previous collect() (or since start() for the first one). */
export interface DirtyRound {
  /** Indices of chunks (of `chunkSize` bytes) that changed, ascending. */
  chunks: number[]
  chunkSize: number
  /** chunks.length * chunkSize (the last chunk may be shorter; counted whole). */
  dirtyBytes: number
  /** Wall time covered by this round, ms (previous collect or start → this collect). */
  intervalMs: number
  /** dirtyBytes / interval, bytes per second. */
  rateBytesPerSec: number
  /** How long collect() itself took, ms (the cost of the tracking method). */
  scanMs: number
}

export interface DirtyTracker {
  /** `soft-dirty` (kernel page bits), `compare` (diff against a retained copy), or a fake's own method. */
  readonly method: string
  readonly chunkSize: number
  /** Marks the baseline: every chunk counts as clean now. */
  start(signal?: AbortSignal): Promise<void>
  /**
   * Returns the chunks that changed since the last collect()/start(), and sets a new baseline.
   * While the guest runs, a write that lands in a chunk after that chunk was scanned shows up in the
   * *next* round only. So the final round of a migration must be collected after pause()/saveState()
   * has resolved (never concurrently with it): only then does it hold every remaining change.
   */
  collect(signal?: AbortSignal): Promise<DirtyRound>
  /** Releases the retained copy / file handles. */
  close(): Promise<void>
}

export interface DirtyTrackerOptions {
  /** Default 64 KiB; a multiple of 4 KiB. */
  chunkSize?: number
  /**
   * `auto` (default): kernel soft-dirty bits when available, else `compare`. Soft-dirty sees only what
   * the hypervisor process writes (the guest); `compare` also sees writes by other processes into the
   * RAM file (tests, tools), at the cost of a RAM-sized copy in this process.
   */
  method?: 'auto' | 'compare'
}

/** Payloads of the VM's events. */
export interface VmEvents {
  paused: { at: number }
  resumed: { at: number }
  /** stop() finished; the process is gone and its files removed. */
  stopped: { at: number }
  /** The process ended without stop() (crash, guest poweroff, kill); files are removed. */
  exited: VmExitInfo & { at: number }
}
export type VmEventName = keyof VmEvents

export interface Vm {
  readonly spec: VmSpec
  readonly memory: MemoryResource
  /** OS process id of the hypervisor, when there is one. */
  readonly pid: number | undefined
  /** Serial console log file (the guest's ttyS0), when there is one. */
  readonly consolePath: string | undefined
  /**
   * The guest NIC's stream socket (the hypervisor listens; the tunnel connects, and may reconnect).
   * Frames are a 4-byte big-endian length + the Ethernet frame. Undefined with `testNet` or in the fake.
   */
  readonly netSocket: string | undefined
  /**
   * The VM's writable disk (spec.volume): a qcow2 overlay on its base, removed by stop() (a crash
   * keeps it: the guest's data). Undefined without a volume or in drivers without disks.
   */
  readonly volumePath?: string | undefined
  /** The move whose end state this incoming VM's disk was seeded with (StartOptions.volumeSeed). */
  readonly volumeSeed?: string | undefined
  status(): VmStatus
  /** Stops the guest CPUs. Idempotent when already paused. */
  pause(signal?: AbortSignal): Promise<void>
  /** Starts the guest CPUs (also after loadState()). Idempotent when already running. */
  resume(signal?: AbortSignal): Promise<void>
  /**
   * Ends the VM for good and removes its sockets and RAM file. Graceful first (QMP quit), then SIGTERM,
   * then SIGKILL. Idempotent; also fine after the VM exited.
   */
  stop(signal?: AbortSignal): Promise<void>
  /**
   * Pauses the guest (if running) and returns its device state without RAM (a few hundred KB). The VM
   * stays paused: resume() to roll back, stop() once the destination runs.
   */
  saveState(signal?: AbortSignal): Promise<Uint8Array>
  /**
   * A copy of the device state taken while the guest runs: it is stopped for the few milliseconds the
   * save takes and continues, without 'paused'/'resumed' events (to its users it never paused). A
   * migration sends it ahead as the reference the final saveState() is sent against. Optional.
   */
  snapshotState?(signal?: AbortSignal): Promise<Uint8Array>
  /** Loads device state saved by saveState() into a VM started with `incoming: true`; stays paused. */
  loadState(state: Uint8Array, signal?: AbortSignal): Promise<void>
  /** A tracker over this VM's RAM. Several may exist; each keeps its own baseline. */
  dirtyTracker(options?: DirtyTrackerOptions): DirtyTracker
  /**
   * A tracker over the VM's writable disk (QEMU dirty bitmaps read over NBD, vm/disk/tracker.ts), or
   * undefined when it has none. One at a time per VM (it runs QEMU's one NBD server).
   */
  diskTracker?(options?: { chunkSize?: number }): DiskTracker | undefined
  /**
   * What a warm standby reads the writable disk with between moves (vm/disk/standby.ts): its own
   * dirty bitmap, QEMU's NBD server only while a pass runs and never while a diskTracker holds it.
   */
  standbyDisk?(chunkSize: number): StandbyDiskReader | undefined
  /**
   * Writes into the writable disk of a VM started `incoming` (a migration's destination) through
   * QEMU's NBD server (vm/disk/writer.ts); undefined when it has no disk.
   */
  diskWriter?(): Promise<DiskWriter> | undefined
  /**
   * A move out is about to stop this paused VM: stop() keeps its disk as the VM's previous disk on this
   * host (vm/disk/previous.ts) instead of removing it, so a move back sends only what changed. Undone
   * when the guest resumes here (a rolled-back move). `since`: the move (session id), so that a move
   * back from where it went can seed from this disk (vm/disk/previous.ts). Without `since`: a failed
   * incoming VM whose disk was seeded from the previous disk gives it back (no record: a retry only
   * fills chunks from it by hash).
   */
  retainVolumeOnStop?(since?: string): void
  /**
   * The move (session id) whose arrival this VM's disk counts the guest's writes since, if it does
   * (vm/disk/tracker.ts markArrival): set on the destination when a move in completes.
   */
  diskArrival?(): Promise<string | undefined>
  /** Starts counting the guest's writes since the arrival of move `sid` (before the guest runs). */
  markDiskArrival?(sid: string, chunkSize: number): Promise<void>
  /** The disk this VM left here on an earlier stay, read-only and indexed by chunk hash, if any. */
  previousDisk?(chunkSize: number): Promise<PreviousDisk | undefined>
  /** The last `n` lines of the serial console (and hypervisor stderr), oldest first. */
  consoleTail(n?: number): Promise<string[]>
  /** Resolves when the VM is gone (stopped or exited). */
  wait(): Promise<VmExitInfo>
  /**
   * Lets go of the VM without stopping it: closes the control connection and stops watching it, so
   * this process may exit while the VM runs on. Re-attach with VmDriver.adopt(driver.handle(vm)).
   */
  detach(): Promise<void>
  on<K extends VmEventName>(event: K, listener: (e: VmEvents[K]) => void): this
  once<K extends VmEventName>(event: K, listener: (e: VmEvents[K]) => void): this
  off<K extends VmEventName>(event: K, listener: (e: VmEvents[K]) => void): this
}

/** What a driver needs to re-attach to a VM process that outlived the process that started it. */
export interface VmHandle {
  spec: VmSpec
  pid: number
  memoryPath: string
  /** Driver-specific paths (QMP socket, console log...). */
  paths: Record<string, string>
}

/** Makes VMs. One per host; paths (RAM dir, runtime dir) are the driver's configuration. */
export interface VmDriver {
  readonly name: string
  start(spec: VmSpec, options?: StartOptions): Promise<Vm>
  /** A handle that adopt() accepts, to persist while the VM runs. */
  handle(vm: Vm): VmHandle
  /** Re-attaches to a VM that is still running (e.g. after an agent restart). Throws when it is gone. */
  adopt(handle: VmHandle, signal?: AbortSignal): Promise<Vm>
}
