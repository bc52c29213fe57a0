/**
 * Dirty tracking of a VM's writable disk with QEMU's own machinery: a block dirty bitmap per round on
 * the disk's node, read back through QEMU's NBD server as the `qemu:dirty-bitmap:NAME` meta context;
 * the data itself is read through an export of the same node (what the guest sees, consistent with
 * QEMU's caches, which reading the qcow2 file behind QEMU's back would not be), and what the overlay
 * holds beyond its base through the `qemu:allocation-depth` context.
 *
 * A round swaps bitmaps atomically (one QMP transaction: add the next, disable the current), so no
 * write falls between two rounds; the disabled bitmap is exported, read and dropped. While the guest
 * runs, a chunk written after it was read shows up in the next round; once the guest is paused (QEMU
 * drains in-flight I/O when it stops the VM) a last round holds every remaining change.
 */
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { describeError, MeshError } from '../../src/base/errors.ts'
import { type NbdClient as Nbd, NbdClient, NbdError } from './nbd.ts'

/** Runs one QMP command on the VM (QemuVm.qmpExecute). */
export type QmpExec = (command: string, args?: Record<string, unknown>) => Promise<unknown>

export class DiskTrackerError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_DISK_TRACKER' })
  }
}

export interface DiskDirtyRound {
  /** Chunks (of chunkSize bytes) written since the previous round, ascending. */
  chunks: number[]
  chunkSize: number
  dirtyBytes: number
  intervalMs: number
  rateBytesPerSec: number
  /** What finding them cost (QMP + NBD block status), ms. */
  scanMs: number
}

export interface DiskTracker {
  readonly method: 'qemu-dirty-bitmap'
  readonly chunkSize: number
  /** The disk's virtual size (after open()). */
  readonly size: number
  /** Starts QEMU's NBD server (unix socket) and the data export. */
  open(): Promise<void>
  /** Chunks the overlay itself holds (the guest wrote them; the rest reads from the base). */
  written(): Promise<number[]>
  /**
   * The baseline: every chunk counts as clean from now. `since`: also take, in the same instant, a copy
   * of the arrival bitmap of move `since` (markArrival): sinceChunks() then holds every chunk written
   * between that arrival and this baseline (a later write shows up in a round).
   */
  start(options?: { since?: string }): Promise<void>
  /** The chunks the copy start({since}) took marks (read once). */
  sinceChunks(): Promise<number[]>
  /** The chunks written since start()/the last collect(), and a new baseline. */
  collect(): Promise<DiskDirtyRound>
  /** Reads `count` chunks from `index` (the last chunk of the disk may be shorter). */
  read(index: number, count?: number): Promise<Buffer>
  /** Drops bitmaps and exports, stops the NBD server. Idempotent. */
  close(): Promise<void>
}

export interface DiskTrackerInit {
  qmp: QmpExec
  /** QEMU node name of the disk (VOLUME_NODE). */
  node: string
  /** Directory for the NBD server's socket (the VM's private run dir). */
  dir: string
  /** Default 64 KiB (the chunk store's chunk); a power of two, at least 4 KiB. */
  chunkSize?: number
}

const DATA_EXPORT = 'mesh-disk'
const DEPTH = 'qemu:allocation-depth'
/** Our NBD export ids (the data export, a round's `x-mesh-dirty-…`, the writer's `mesh-disk-in`). */
const OUR_EXPORT = /^(x-)?mesh-/
const OUR_BITMAP = /^mesh-dirty-/
/**
 * The bitmap a disk gets when a move brought it here (one at a time): every guest write since the
 * arrival of move SID. The host the VM came from kept its disk as it was at that moment
 * (vm/disk/previous.ts), so a move back there needs only these chunks.
 */
const SINCE = 'mesh-since-'

type NodeBitmaps = Array<{
  'node-name': string
  'dirty-bitmaps'?: Array<{ name: string; recording?: boolean }>
}>

async function bitmapsOf(qmp: QmpExec, node: string): Promise<string[]> {
  const nodes = (await qmp('query-named-block-nodes', { flat: true })) as NodeBitmaps
  return nodes
    .filter((x) => x['node-name'] === node)
    .flatMap((n) => (n['dirty-bitmaps'] ?? []).map((b) => b.name))
}

/** The move whose arrival this disk counts writes since (markArrival), if any. */
export async function arrivalOf(qmp: QmpExec, node: string): Promise<string | undefined> {
  const names = (await bitmapsOf(qmp, node)).filter((n) => n.startsWith(SINCE))
  return names.length === 1 ? names[0]!.slice(SINCE.length) : undefined
}

/**
 * Starts counting the guest's writes since the arrival of move `sid` (the disk holds exactly what the
 * source had when it paused; nothing else writes it until the guest runs). Replaces an older one.
 * Kept in QEMU's memory only: a QEMU that restarts has none, and the next move takes the full path.
 */
export async function markArrival(qmp: QmpExec, node: string, chunkSize: number, sid: string): Promise<void> {
  for (const n of await bitmapsOf(qmp, node)) if (n.startsWith(SINCE)) await removeBitmap(qmp, node, n)
  await qmp('block-dirty-bitmap-add', {
    node,
    name: `${SINCE}${sid}`,
    granularity: chunkSize,
    persistent: false,
  })
}

/** Removes a dirty bitmap, waiting for an export that still holds it (its deletion is asynchronous). */
export async function removeBitmap(qmp: QmpExec, node: string, name: string): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await qmp('block-dirty-bitmap-remove', { node, name })
      return
    } catch (err) {
      if (i >= 50) throw err
      await sleep(20)
    }
  }
}

/**
 * Starts counting in bitmap `next` and stops `done`, in one transaction: every write lands in exactly one
 * of the two.
 */
export async function rotateBitmap(
  qmp: QmpExec,
  node: string,
  chunkSize: number,
  done: string,
  next: string,
): Promise<void> {
  await qmp('transaction', {
    actions: [
      {
        type: 'block-dirty-bitmap-add',
        data: { node, name: next, granularity: chunkSize, persistent: false },
      },
      { type: 'block-dirty-bitmap-disable', data: { node, name: done } },
    ],
  })
}

/**
 * The chunks a (disabled) bitmap marks dirty, read through a temporary NBD export of the node with the
 * `qemu:dirty-bitmap` context on the server at `sock`; the export and the bitmap are removed afterwards.
 */
export async function takeDirtyChunks(
  qmp: QmpExec,
  sock: string,
  node: string,
  bitmap: string,
  chunkSize: number,
): Promise<number[]> {
  const id = `x-${bitmap}`
  try {
    await qmp('block-export-add', {
      type: 'nbd',
      id,
      'node-name': node,
      name: bitmap,
      writable: false,
      bitmaps: [bitmap],
    })
    const c = await NbdClient.connect(sock, bitmap, [`qemu:dirty-bitmap:${bitmap}`])
    try {
      return extentsToChunks(
        await c.blockStatus(`qemu:dirty-bitmap:${bitmap}`),
        chunkSize,
        (f) => (f & 1) !== 0,
      )
    } finally {
      c.close()
    }
  } finally {
    await qmp('block-export-del', { id, mode: 'hard' }).catch(() => {})
    await removeBitmap(qmp, node, bitmap).catch(() => {})
  }
}

/**
 * Removes what an agent that died during a move left in this VM's QEMU: our NBD exports, the NBD
 * server, our dirty bitmaps (which would keep counting writes for nobody). The restarted agent
 * re-adopted the VM (or the guest never stopped), and the server still running would make every later
 * move fail at nbd-server-start. Only called when a tracker opens: one move of a VM at a time, so
 * whatever of ours is there is stale. Returns what it removed.
 */
export async function clearLeftovers(qmp: QmpExec, node: string): Promise<string[]> {
  const removed: string[] = []
  const exports = (await qmp('query-block-exports')) as Array<{ id: string }>
  for (const e of exports)
    if (OUR_EXPORT.test(e.id)) {
      await qmp('block-export-del', { id: e.id, mode: 'hard' })
      removed.push(`export ${e.id}`)
    }
  try {
    await qmp('nbd-server-stop')
    removed.push('nbd server')
  } catch (err) {
    // QEMU: "NBD server not running" is the normal case.
    if (!/not running/i.test(describeError(err))) throw err
  }
  const nodes = (await qmp('query-named-block-nodes', { flat: true })) as Array<{
    'node-name': string
    'dirty-bitmaps'?: Array<{ name: string }>
  }>
  for (const n of nodes.filter((x) => x['node-name'] === node))
    for (const b of n['dirty-bitmaps'] ?? [])
      if (OUR_BITMAP.test(b.name)) {
        // An export being deleted still holds its bitmap for a moment (deletion is asynchronous).
        for (let i = 0; ; i++) {
          try {
            await qmp('block-dirty-bitmap-remove', { node, name: b.name })
            break
          } catch (err) {
            if (i >= 50) throw err
            await sleep(20)
          }
        }
        removed.push(`bitmap ${b.name}`)
      }
  return removed
}

/**
 * What QEMU says about the disk's NBD side when an NBD operation failed, for the error: its run state
 * and the exports it still has (none left: someone stopped the NBD server; QMP silent: QEMU is gone).
 * The error that follows a closed connection then says which of those it was.
 */
export async function nbdSideOf(qmp: QmpExec): Promise<string> {
  try {
    const st = (await qmp('query-status')) as { status?: string }
    const exports = (await qmp('query-block-exports')) as Array<{ id: string; 'shutting-down'?: boolean }>
    const list = exports.map((e) => `${e.id}${e['shutting-down'] === true ? ' (shutting down)' : ''}`)
    return `QEMU is ${st.status ?? 'in an unknown state'}, its block exports: ${list.length === 0 ? 'none' : list.join(', ')}`
  } catch (err) {
    return `QEMU does not answer on QMP: ${describeError(err)}`
  }
}

/** Expands extents whose flags match into chunk indices (a chunk touched in any byte counts). */
export function extentsToChunks(
  extents: ReadonlyArray<{ offset: number; length: number; flags: number }>,
  chunkSize: number,
  match: (flags: number) => boolean,
): number[] {
  const out: number[] = []
  let last = -1
  for (const e of extents) {
    if (!match(e.flags) || e.length === 0) continue
    const first = Math.max(Math.floor(e.offset / chunkSize), last + 1)
    const end = Math.floor((e.offset + e.length - 1) / chunkSize)
    for (let i = first; i <= end; i++) out.push(i)
    if (end > last) last = end
  }
  return out
}

export function createDiskTracker(init: DiskTrackerInit): DiskTracker {
  const chunkSize = init.chunkSize ?? 64 * 1024
  if (chunkSize < 4096 || (chunkSize & (chunkSize - 1)) !== 0)
    throw new RangeError(`disk chunk size must be a power of two of at least 4 KiB, got ${chunkSize}`)
  const sock = join(init.dir, 'nbd.sock')
  const { qmp, node } = init
  let data: Nbd | undefined
  let serverUp = false
  let exported = false
  let current: string | undefined
  let snapshot: string | undefined
  let seq = 0
  let since = 0
  let size = 0
  const bitmap = () => `mesh-dirty-${process.pid}-${++seq}`
  const need = (): Nbd => {
    if (data === undefined) throw new DiskTrackerError('disk tracker is not open')
    return data
  }
  const dropBitmap = (name: string) => removeBitmap(qmp, node, name)
  let openedAt = 0
  /** An NBD failure, with what QEMU says about its NBD side (a closed connection: who closed it). */
  const explained = async <T>(what: string, op: () => Promise<T>): Promise<T> => {
    try {
      return await op()
    } catch (err) {
      if (!(err instanceof NbdError)) throw err
      const ms = Math.round(performance.now() - openedAt)
      throw new DiskTrackerError(
        `${what} of node '${node}' failed ${ms} ms after the tracker opened: ${describeError(err)} (${await nbdSideOf(qmp)})`,
        { cause: err },
      )
    }
  }
  return {
    method: 'qemu-dirty-bitmap',
    chunkSize,
    get size() {
      return size
    },
    async open() {
      if (data !== undefined) return
      try {
        await clearLeftovers(qmp, node)
        await qmp('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } })
        serverUp = true
        await qmp('block-export-add', {
          type: 'nbd',
          id: DATA_EXPORT,
          'node-name': node,
          name: DATA_EXPORT,
          writable: false,
          'allocation-depth': true,
        })
        exported = true
        data = await NbdClient.connect(sock, DATA_EXPORT, [DEPTH])
        size = data.size
        openedAt = performance.now()
      } catch (err) {
        await this.close().catch(() => {})
        throw new DiskTrackerError(`cannot open the disk of node '${node}': ${describeError(err)}`, {
          cause: err,
        })
      }
    },
    async written() {
      // Depth 1: allocated in the overlay itself (0: nowhere, reads zeros; 2+: the base).
      const d = need()
      const depth = await explained('the allocation depth', () => d.blockStatus(DEPTH))
      return extentsToChunks(depth, chunkSize, (f) => f === 1)
    },
    async start(options = {}) {
      need()
      const name = bitmap()
      const add = { node, name, granularity: chunkSize, persistent: false }
      if (options.since === undefined) await qmp('block-dirty-bitmap-add', add)
      else {
        // One transaction: a write lands in the copy or in the first round, never in neither.
        const copy = bitmap()
        await qmp('transaction', {
          actions: [
            { type: 'block-dirty-bitmap-add', data: add },
            {
              type: 'block-dirty-bitmap-add',
              data: { node, name: copy, granularity: chunkSize, persistent: false, disabled: true },
            },
            {
              type: 'block-dirty-bitmap-merge',
              data: { node, target: copy, bitmaps: [`${SINCE}${options.since}`] },
            },
          ],
        })
        snapshot = copy
      }
      if (current !== undefined) await dropBitmap(current).catch(() => {})
      current = name
      since = performance.now()
    },
    async sinceChunks() {
      need()
      if (snapshot === undefined) throw new DiskTrackerError('sinceChunks() without start({since})')
      const s = snapshot
      snapshot = undefined
      return explained('the writes since the arrival', () => takeDirtyChunks(qmp, sock, node, s, chunkSize))
    },
    async collect() {
      need()
      if (current === undefined) throw new DiskTrackerError('collect() before start()')
      const t0 = performance.now()
      const done = current
      const next = bitmap()
      await rotateBitmap(qmp, node, chunkSize, done, next)
      current = next
      const interval = t0 - since
      since = t0
      const chunks = await explained('a dirty round', () => takeDirtyChunks(qmp, sock, node, done, chunkSize))
      const dirtyBytes = chunks.length * chunkSize
      return {
        chunks,
        chunkSize,
        dirtyBytes,
        intervalMs: interval,
        rateBytesPerSec: interval > 0 ? (dirtyBytes * 1000) / interval : 0,
        scanMs: performance.now() - t0,
      }
    },
    async read(index, count = 1) {
      const d = need()
      const offset = index * chunkSize
      const len = Math.min(count * chunkSize, d.size - offset)
      if (len <= 0) throw new DiskTrackerError(`chunk ${index} is outside the disk`)
      return explained(`reading chunks ${index}+${count}`, () => d.read(offset, len))
    },
    async close() {
      data?.close()
      data = undefined
      for (const b of [current, snapshot]) if (b !== undefined) await dropBitmap(b).catch(() => {})
      current = undefined
      snapshot = undefined
      if (exported) {
        exported = false
        await qmp('block-export-del', { id: DATA_EXPORT, mode: 'hard' }).catch(() => {})
      }
      if (serverUp) {
        serverUp = false
        await qmp('nbd-server-stop').catch(() => {})
      }
    },
  }
}
