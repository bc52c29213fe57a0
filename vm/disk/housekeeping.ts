/**
 * What a host's disk dir (STATE/disks) must not accumulate:
 *
 * - incoming disks a killed agent left: `<vm>.in-<8 hex>.qcow2` of a move that never completed here.
 *   The agent's start-up sweep takes those that no VM of this host uses (its VM records name their
 *   disks) and no live process has open on its command line (a committed incoming move's QEMU, which
 *   the migration service re-adopts, keeps its disk). The newest of a VM that has no previous disk here
 *   and does not run here becomes its previous disk, without a record (a disk seeded from the old
 *   previous disk holds it, and any holds this attempt's chunks: a retry fills from it by hash, never
 *   seeds from it); the others are removed;
 * - previous disks (`<vm>.prev.qcow2`, kept when a VM moves away so that a move back sends only what
 *   changed, vm/disk/previous.ts): like the RAM a host keeps as chunks after a move (one pinned manifest
 *   per VM, bounded by the chunk store's size), one per VM, and all of them together within a budget:
 *   `MESH_PREV_DISKS_MAX` (bytes, or with a K/M/G/T suffix; 0 keeps none), by default a quarter of the
 *   file system the disks live on. Over budget, the oldest (the VM that left longest ago) go first. A
 *   pruned previous disk only makes a later return move send more; it is never the VM's own disk.
 */
import { readdir, readFile, rename, rm, stat, statfs } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { processAlive } from '../../src/base/process.ts'
import { VolumeError } from './volume.ts'

const INCOMING_RE = /\.in-[0-9a-f]{8}\.qcow2$/
const PREVIOUS_RE = /\.prev\.qcow2$/
/** The NBD socket of an open previous disk: `.<vm>.prev-<pid>.sock`. */
const PREV_SOCK_RE = /^\..*\.prev-(\d+)\.sock$/

/** Command lines of the live processes (pid → NUL-joined arguments). */
async function commandLines(): Promise<string[]> {
  const out: string[] = []
  for (const name of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue
    const cmd = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')
    if (cmd !== '') out.push(cmd)
  }
  return out
}

export interface SweepResult {
  /** Files removed (incoming disks, dead reader sockets). */
  removed: string[]
  /** Incoming disks kept as their VM's previous disk (record-less). */
  kept: string[]
}

/**
 * Takes incoming disks nothing uses (see above): the newest of a VM with no previous disk here and no
 * disk in use becomes its previous disk, the rest are removed; and removes sockets of previous-disk
 * readers whose process is gone. `inUse`: the disks of this host's VMs (running or not).
 */
export async function sweepIncomingDisks(diskDir: string, inUse: ReadonlySet<string>): Promise<SweepResult> {
  const removed: string[] = []
  const kept: string[] = []
  const names = await readdir(diskDir).catch(() => [] as string[])
  const candidates = names.filter((n) => INCOMING_RE.test(n))
  const open = candidates.length > 0 ? await commandLines() : []
  const unused: Array<{ name: string; path: string; vm: string; mtimeMs: number }> = []
  for (const name of candidates) {
    const path = join(diskDir, name)
    if (inUse.has(path) || open.some((c) => c.includes(path))) continue
    const mtimeMs = (await stat(path).catch(() => undefined))?.mtimeMs ?? 0
    unused.push({ name, path, vm: name.replace(INCOMING_RE, ''), mtimeMs })
  }
  unused.sort((x, y) => y.mtimeMs - x.mtimeMs)
  const used = [...inUse].map((p) => basename(p))
  const hasPrevious = new Set(names.filter((n) => PREVIOUS_RE.test(n)).map((n) => n.replace(PREVIOUS_RE, '')))
  for (const d of unused) {
    const runsHere = used.some((n) => n === `${d.vm}.qcow2` || n.startsWith(`${d.vm}.in-`))
    if (!hasPrevious.has(d.vm) && !runsHere) {
      // A record names only the disk it was written for: none may survive for this one.
      await rm(join(diskDir, `${d.vm}.prev.since`), { force: true })
      await rename(d.path, join(diskDir, `${d.vm}.prev.qcow2`))
      hasPrevious.add(d.vm)
      kept.push(d.path)
      continue
    }
    await rm(d.path, { force: true })
    removed.push(d.path)
  }
  for (const n of names) {
    const m = PREV_SOCK_RE.exec(n)
    if (m !== null && !processAlive(Number(m[1]))) {
      await rm(join(diskDir, n), { force: true })
      removed.push(join(diskDir, n))
    }
  }
  return { removed, kept }
}

/** Parses a byte count: `1073741824`, `512M`, `20G`, `1.5T` (binary units). */
export function parseBytes(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text)
  if (m === null) throw new VolumeError(`'${text}' is not a size (bytes, or a number with K, M, G or T)`)
  const unit = { '': 0, K: 1, M: 2, G: 3, T: 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']
  return Math.floor(Number(m[1]) * 1024 ** unit)
}

/** How many bytes previous disks may take in `diskDir`: MESH_PREV_DISKS_MAX, else 1/4 of its file system. */
export async function previousDisksBudget(
  diskDir: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<number> {
  const v = env.MESH_PREV_DISKS_MAX
  if (v !== undefined && v.trim() !== '') return parseBytes(v)
  try {
    const fs = await statfs(diskDir)
    return Math.floor((fs.blocks * fs.bsize) / 4)
  } catch {
    return Number.POSITIVE_INFINITY
  }
}

export interface PrunedDisk {
  path: string
  bytes: number
}

/**
 * Removes previous disks, oldest first, until those left take at most `maxBytes` (their allocated
 * size on the file system). Returns what it removed.
 */
export async function prunePreviousDisks(diskDir: string, maxBytes: number): Promise<PrunedDisk[]> {
  const disks: Array<PrunedDisk & { mtimeMs: number }> = []
  for (const n of await readdir(diskDir).catch(() => [] as string[])) {
    if (!PREVIOUS_RE.test(n)) continue
    const path = join(diskDir, n)
    const st = await stat(path).catch(() => undefined)
    if (st !== undefined) disks.push({ path, bytes: st.blocks * 512, mtimeMs: st.mtimeMs })
  }
  let total = disks.reduce((s, d) => s + d.bytes, 0)
  const removed: PrunedDisk[] = []
  disks.sort((x, y) => x.mtimeMs - y.mtimeMs)
  for (const d of disks) {
    if (total <= maxBytes) break
    await rm(d.path, { force: true })
    // Its record (vm/disk/previous.ts previousSincePath) names a file that is gone.
    await rm(d.path.replace(PREVIOUS_RE, '.prev.since'), { force: true })
    total -= d.bytes
    removed.push({ path: d.path, bytes: d.bytes })
  }
  return removed
}
