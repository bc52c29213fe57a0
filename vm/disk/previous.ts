/**
 * The disk a VM left behind on this host when it moved away (`<vm>.prev.qcow2` in the disk dir): when
 * the VM comes back, the destination fills every offered chunk whose hash it finds there locally
 * instead of asking the source for it, so a return move sends only what changed while the VM was away
 * (the disk's counterpart of the RAM cache). The old overlay is read through `qemu-nbd` (QEMU's own
 * userspace NBD server, read-only, no kernel module): the chunks it holds (allocation depth 1) are
 * hashed once, on the first offer.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync } from 'node:fs'
import { readFile, rename, rm, stat, utimes } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { forEachLimit } from '../../src/base/concurrency.ts'
import { describeError } from '../../src/base/errors.ts'
import { writeFileDurable } from '../../src/base/fs.ts'
import { type Logger, silentLogger } from '../../src/base/log.ts'
import { type PrunedDisk, previousDisksBudget, prunePreviousDisks } from './housekeeping.ts'
import { NbdClient } from './nbd.ts'
import { extentsToChunks } from './tracker.ts'

/** Where the disk a VM left behind is kept. */
export function previousVolumePath(diskDir: string, vm: string): string {
  return join(diskDir, `${vm}.prev.qcow2`)
}

/**
 * Which move the previous disk is the end of (`<vm>.prev.since`, JSON): the session id of the move that
 * took the VM away, and the file's size and mtime when it was kept. The host the VM went to counts the
 * guest's writes since its arrival in a dirty bitmap named after that move (`mesh-since-<sid>`,
 * vm/disk/tracker.ts); when the VM comes back from there, the old disk plus those blocks is the disk,
 * so the destination seeds its incoming disk with the old one (seedPreviousVolume) and the source
 * reads and sends only those blocks. No file, or a file that does not match: the full path.
 */
export function previousSincePath(diskDir: string, vm: string): string {
  return join(diskDir, `${vm}.prev.since`)
}

interface SinceRecord {
  sid: string
  size: number
  mtimeMs: number
}

/**
 * Keeps a stopped VM's overlay as its previous disk (replacing an older one), then holds all previous
 * disks of the dir to their budget (vm/disk/housekeeping.ts; this one counts as the newest). `since`:
 * the move that took it away (see previousSincePath). Returns the previous disks the budget removed.
 */
export async function retainVolume(
  path: string,
  diskDir: string,
  vm: string,
  since?: string,
): Promise<PrunedDisk[]> {
  const kept = previousVolumePath(diskDir, vm)
  const record = previousSincePath(diskDir, vm)
  // The old record goes first: a record never names a file other than the one it was written for.
  await rm(record, { force: true })
  await rename(path, kept)
  const now = new Date()
  await utimes(kept, now, now)
  if (since !== undefined) {
    const st = await stat(kept)
    const r: SinceRecord = { sid: since, size: st.size, mtimeMs: st.mtimeMs }
    await writeFileDurable(record, JSON.stringify(r))
  }
  return prunePreviousDisks(diskDir, await previousDisksBudget(diskDir))
}

/**
 * Turns the previous disk of `vm` into `dest` (the incoming copy's disk) when it is the end of move
 * `since` and unchanged since it was kept; true if it did. The file is moved, not copied: it was
 * nobody's disk (the guest that used it has run elsewhere since), and a failed move removes it with
 * the incoming VM like any incoming disk.
 */
export async function seedPreviousVolume(
  diskDir: string,
  vm: string,
  since: string,
  dest: string,
): Promise<boolean> {
  const kept = previousVolumePath(diskDir, vm)
  const record = previousSincePath(diskDir, vm)
  let r: Partial<SinceRecord>
  try {
    r = JSON.parse(await readFile(record, 'utf8')) as Partial<SinceRecord>
  } catch {
    return false
  }
  const st = await stat(kept).catch(() => undefined)
  if (st === undefined || r.sid !== since || r.size !== st.size || r.mtimeMs !== st.mtimeMs) return false
  await rename(kept, dest)
  await rm(record, { force: true })
  return true
}

export interface PreviousDisk {
  /**
   * The bytes of the old disk's chunks with these SHA-256s (an offer's), undefined where it held none.
   * Found chunks are read in runs of consecutive ones, a few runs in flight (one NBD round trip per
   * chunk made a 1.3 GB return move take ~58 s in bench disk), each verified against its hash.
   */
  fill(hashes: readonly Uint8Array[]): Promise<Array<Buffer | undefined>>
  readonly chunks: number
  close(): Promise<void>
}

/** Opens the previous disk of `vm`, if there is one (undefined otherwise, or when it cannot be read). */
export async function openPreviousDisk(
  diskDir: string,
  vm: string,
  chunkSize: number,
  log: Logger = silentLogger,
): Promise<PreviousDisk | undefined> {
  const path = previousVolumePath(diskDir, vm)
  if (!existsSync(path)) return undefined
  const sock = join(diskDir, `.${vm}.prev-${process.pid}.sock`)
  let child: ChildProcess | undefined
  let client: NbdClient | undefined
  const close = async () => {
    client?.close()
    client = undefined
    if (child !== undefined && child.exitCode === null) {
      const exited = new Promise((r) => child!.once('exit', r))
      child.kill('SIGTERM')
      await Promise.race([exited, sleep(5000)])
    }
    await rm(sock, { force: true })
  }
  try {
    await rm(sock, { force: true })
    child = spawn('qemu-nbd', ['-r', '-f', 'qcow2', '-A', '-t', '-x', 'prev', '-k', sock, path], {
      stdio: ['ignore', 'ignore', 'pipe'],
    })
    let err = ''
    child.stderr?.on('data', (b: Buffer) => {
      err = (err + b.toString()).slice(-2000)
    })
    for (let i = 0; i < 200 && !existsSync(sock); i++) {
      if (child.exitCode !== null) throw new Error(`qemu-nbd exited: ${err.trim()}`)
      await sleep(25)
    }
    client = await NbdClient.connect(sock, 'prev', ['qemu:allocation-depth'])
    const c = client
    const held = extentsToChunks(await c.blockStatus('qemu:allocation-depth'), chunkSize, (f) => f === 1)
    const byHash = new Map<string, number>()
    for (let k = 0; k < held.length; ) {
      let n = 1
      while (k + n < held.length && held[k + n] === held[k]! + n && n < 64) n++
      const first = held[k]!
      const len = Math.min(n * chunkSize, c.size - first * chunkSize)
      const buf = await c.read(first * chunkSize, len)
      for (let i = 0; i * chunkSize < len; i++) {
        const h = createHash('sha256')
          .update(buf.subarray(i * chunkSize, (i + 1) * chunkSize))
          .digest('hex')
        byHash.set(h, first + i)
      }
      k += n
    }
    const verified = (data: Buffer, hash: Uint8Array) =>
      createHash('sha256').update(data).digest().equals(Buffer.from(hash))
    return {
      chunks: byHash.size,
      async fill(hashes) {
        const out: Array<Buffer | undefined> = new Array(hashes.length).fill(undefined)
        const found: Array<{ i: number; at: number }> = []
        hashes.forEach((h, i) => {
          const at = byHash.get(Buffer.from(h).toString('hex'))
          if (at !== undefined) found.push({ i, at })
        })
        found.sort((x, y) => x.at - y.at)
        // Runs of consecutive chunks (the same chunk offered twice joins its run), at most 64 chunks.
        const runs: Array<typeof found> = []
        for (const f of found) {
          const run = runs.at(-1)
          const last = run?.at(-1)
          if (run !== undefined && last !== undefined && f.at - last.at <= 1 && f.at - run[0]!.at < 64)
            run.push(f)
          else runs.push([f])
        }
        await forEachLimit(runs, 4, async (run) => {
          const first = run[0]!.at
          const len = Math.min((run.at(-1)!.at - first + 1) * chunkSize, c.size - first * chunkSize)
          const buf = await c.read(first * chunkSize, len)
          for (const f of run) {
            const data = buf.subarray((f.at - first) * chunkSize, (f.at - first + 1) * chunkSize)
            // Verified like any chunk that goes into a guest: the file may have changed under us.
            if (verified(data, hashes[f.i]!)) out[f.i] = data
          }
        })
        return out
      },
      close,
    }
  } catch (e) {
    log.warn('the previous disk cannot be read; every chunk comes from the source', {
      vm,
      error: describeError(e),
    })
    await close()
    return undefined
  }
}
