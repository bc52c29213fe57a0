/**
 * The warm standby's view of a VM's writable disk (src/agent/spot/standby.ts): each pass hashes the
 * chunks the overlay holds into a manifest of the whole disk (64 KiB chunks, the migration's DiskSender
 * hashes the same way, so a chunk the standby stores is one the destination's DiskReceiver finds in its
 * chunk store and does not ask for). The first pass reads everything the overlay holds; later passes
 * read only what a QEMU dirty bitmap of the standby's own saw since the pass before (bitmaps swapped in
 * one QMP transaction, as vm/disk/tracker.ts does for a move). While the standby pulls, the chunks are
 * served from the disk itself through QEMU's NBD server (what the guest sees); the server is stopped
 * between passes.
 *
 * QEMU has one NBD server per VM, which a move's DiskTracker needs: a DiskArbiter gives it to the move
 * at once (the standby's pass in flight is told to stop and its server closed first); the standby's
 * next pass waits until the move has let go. The standby's bitmap survives a move's leftover sweep
 * (different name), so a move that rolls back does not cost the standby a full pass.
 */
import { join } from 'node:path'
import { HASH_SIZE, sha256 } from '../../net/chunks/hash.ts'
import type { Manifest } from '../../net/chunks/interfaces.ts'
import { makeManifest } from '../../net/chunks/manifest.ts'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError, MeshError } from '../../src/base/errors.ts'
import { NbdClient } from './nbd.ts'
import { extentsToChunks, type QmpExec, removeBitmap, rotateBitmap, takeDirtyChunks } from './tracker.ts'

export class StandbyDiskError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_STANDBY_DISK' })
  }
}

/** Who uses QEMU's NBD server of one VM: a move (exclusive, at once) or the standby (when free). */
export interface DiskArbiter {
  /** For a move: stops the standby's use (awaits its release) and holds the server until release(). */
  exclusive(): Promise<() => void>
  /**
   * For the standby: the server if no move holds it (waits for the move's release otherwise);
   * `onPreempt` runs when a move asks for it and must lead to release() soon.
   */
  shared(onPreempt: () => void, signal?: AbortSignal): Promise<() => void>
}

export function createDiskArbiter(): DiskArbiter {
  let moves = 0
  let moveDone: Promise<void> = Promise.resolve()
  let endMove: () => void = () => {}
  let standby: { preempt: () => void; released: Promise<void> } | undefined
  return {
    async exclusive() {
      if (moves++ === 0) moveDone = new Promise((r) => (endMove = r))
      const s = standby
      if (s !== undefined) {
        s.preempt()
        await s.released
      }
      let done = false
      return () => {
        if (done) return
        done = true
        if (--moves === 0) endMove()
      }
    },
    async shared(onPreempt, signal) {
      for (;;) {
        if (signal?.aborted) throw new AbortError('standby disk pass aborted', { cause: signal.reason })
        if (moves === 0 && standby === undefined) break
        let offAbort = () => {}
        await Promise.race([
          moves > 0 ? moveDone : (standby?.released ?? Promise.resolve()),
          new Promise<void>((r) => {
            offAbort = onAbort(signal, () => r())
          }),
        ])
        offAbort()
      }
      let release!: () => void
      const released = new Promise<void>((r) => (release = r))
      const mine = { preempt: onPreempt, released }
      standby = mine
      let done = false
      return () => {
        if (done) return
        done = true
        if (standby === mine) standby = undefined
        release()
      }
    },
  }
}

export interface StandbyDiskPass {
  /** The whole disk: the hash of each chunk the overlay holds, zero hashes elsewhere. */
  manifest: Manifest
  /** Bytes the overlay holds (non-zero chunks in the manifest). */
  heldBytes: number
  /** Chunks this pass read: all at the first pass, the bitmap's since the last one after. */
  readChunks: number
  /** Bytes that changed since the last pass (undefined at the first). */
  changedBytes?: number
  /** Reads chunk `index` into `target` while the pass is open (the standby's pull). */
  read(index: number, target: Uint8Array): Promise<number>
  /** True once a move took the disk (reads fail from then on). */
  readonly preempted: boolean
  /** Ends the pass: the NBD server is stopped, the bitmap keeps counting for the next pass. */
  close(): Promise<void>
}

export interface StandbyDiskReader {
  readonly chunkSize: number
  /** Opens a pass (waits while a move holds the disk). */
  pass(signal: AbortSignal): Promise<StandbyDiskPass>
  /** Drops the bitmap (the standby ended). Idempotent. */
  close(): Promise<void>
}

export interface StandbyDiskInit {
  qmp: QmpExec
  node: string
  dir: string
  arbiter: DiskArbiter
  chunkSize?: number
}

const EXPORT = 'mesh-standby-data'
const DEPTH = 'qemu:allocation-depth'
const BITMAP = /^mesh-standby-/
/** Chunks per NBD read when hashing. */
const READ_RUN = 64

export function createStandbyDiskReader(init: StandbyDiskInit): StandbyDiskReader {
  const chunkSize = init.chunkSize ?? 64 * 1024
  const { qmp, node } = init
  const sock = join(init.dir, 'nbd-standby.sock')
  let seq = 0
  let current: string | undefined
  let hashes: Buffer | undefined
  let size = 0
  let closed = false
  const bitmapName = () => `mesh-standby-${process.pid}-${++seq}`
  const dropBitmap = (name: string) => removeBitmap(qmp, node, name)
  /** Bitmaps of an earlier standby (a restarted agent's): they would count writes for nobody. */
  const clearOldBitmaps = async () => {
    const nodes = (await qmp('query-named-block-nodes', { flat: true })) as Array<{
      'node-name': string
      'dirty-bitmaps'?: Array<{ name: string }>
    }>
    for (const n of nodes.filter((x) => x['node-name'] === node))
      for (const b of n['dirty-bitmaps'] ?? []) if (BITMAP.test(b.name)) await dropBitmap(b.name)
  }
  return {
    chunkSize,
    async pass(signal) {
      if (closed) throw new StandbyDiskError('standby disk reader is closed')
      let preempted = false
      let serving = false
      const passAc = new AbortController()
      const release = await init.arbiter.shared(() => {
        preempted = true
        passAc.abort(new AbortError('a move took the disk'))
        // Serving the standby's pull: nobody waits on the signal, so let go of the disk here.
        if (serving) void stop()
      }, signal)
      const sig = AbortSignal.any([signal, passAc.signal])
      let serverUp = false
      let exported = false
      let data: NbdClient | undefined
      let stopping: Promise<void> | undefined
      const stop = () => (stopping ??= stopNow())
      const stopNow = async () => {
        data?.close()
        data = undefined
        if (exported) {
          exported = false
          await qmp('block-export-del', { id: EXPORT, mode: 'hard' }).catch(() => {})
        }
        if (serverUp) {
          serverUp = false
          await qmp('nbd-server-stop').catch(() => {})
        }
        release()
      }
      try {
        await qmp('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } })
        serverUp = true
        await qmp('block-export-add', {
          type: 'nbd',
          id: EXPORT,
          'node-name': node,
          name: EXPORT,
          writable: false,
          'allocation-depth': true,
        })
        exported = true
        const d = await NbdClient.connect(sock, EXPORT, [DEPTH])
        data = d
        let toRead: number[]
        let changedBytes: number | undefined
        if (current === undefined || hashes === undefined || d.size !== size) {
          await clearOldBitmaps()
          // The baseline before the read: whatever the guest writes from here shows up next pass.
          const name = bitmapName()
          await qmp('block-dirty-bitmap-add', { node, name, granularity: chunkSize, persistent: false })
          current = name
          size = d.size
          hashes = Buffer.alloc(Math.ceil(size / chunkSize) * HASH_SIZE)
          // Depth 1: the overlay holds it (the guest wrote it); the rest is the base or zeros.
          toRead = extentsToChunks(await d.blockStatus(DEPTH), chunkSize, (f) => f === 1)
        } else {
          const done = current
          const next = bitmapName()
          await rotateBitmap(qmp, node, chunkSize, done, next)
          current = next
          toRead = await takeDirtyChunks(qmp, sock, node, done, chunkSize)
          changedBytes = toRead.length * chunkSize
        }
        const h = hashes
        for (let k = 0; k < toRead.length; ) {
          if (sig.aborted) throw new AbortError('standby disk pass aborted', { cause: sig.reason })
          const first = toRead[k]!
          let n = 1
          while (k + n < toRead.length && toRead[k + n] === first + n && n < READ_RUN) n++
          const off = first * chunkSize
          const buf = await d.read(off, Math.min(n * chunkSize, size - off))
          for (let i = 0; i * chunkSize < buf.length; i++) {
            const c = buf.subarray(i * chunkSize, Math.min((i + 1) * chunkSize, buf.length))
            const at = (first + i) * HASH_SIZE
            // A zero chunk stays a zero hash (sent as 'zero' by a move, never fetched).
            if (isZero(c)) h.fill(0, at, at + HASH_SIZE)
            else sha256(c).copy(h, at)
          }
          k += n
        }
        serving = true
        let held = 0
        for (let at = 0; at < h.length; at += HASH_SIZE) if (!isZeroSlice(h, at)) held++
        return {
          // Copied: the next pass changes `hashes` while this manifest may still be served.
          manifest: makeManifest(size, chunkSize, Buffer.from(h)),
          heldBytes: held * chunkSize,
          readChunks: toRead.length,
          ...(changedBytes === undefined ? {} : { changedBytes }),
          get preempted() {
            return preempted
          },
          async read(index, target) {
            if (data === undefined || preempted) throw new StandbyDiskError('the standby disk pass has ended')
            const off = index * chunkSize
            const len = Math.min(target.byteLength, size - off)
            if (index < 0 || len <= 0) throw new StandbyDiskError(`chunk ${index} is outside the disk`)
            const b = await data.read(off, len)
            target.set(b)
            return b.length
          },
          close: stop,
        }
      } catch (err) {
        await stop()
        // A move that took the disk mid-pass, or a stale baseline: the next pass starts over.
        current = undefined
        if (err instanceof AbortError) throw err
        if (preempted) throw new AbortError('a move took the disk', { cause: err })
        throw new StandbyDiskError(`standby pass over the disk of '${node}': ${describeError(err)}`, {
          cause: err,
        })
      }
    },
    async close() {
      if (closed) return
      closed = true
      const c = current
      current = undefined
      hashes = undefined
      if (c !== undefined) await dropBitmap(c).catch(() => {})
    },
  }
}

const ZEROS = Buffer.alloc(128 * 1024)
function isZero(b: Buffer): boolean {
  return b.length <= ZEROS.length ? b.equals(ZEROS.subarray(0, b.length)) : b.every((x) => x === 0)
}
function isZeroSlice(h: Buffer, at: number): boolean {
  for (let i = at; i < at + HASH_SIZE; i++) if (h[i] !== 0) return false
  return true
}
