/**
 * What a host's disk dir (STATE/disks) must not accumulate:
 *
 * - incoming disks a killed agent left: `<vm>.in-<8 hex>.qcow2` of a move that never completed here.
 *   The agent's start-up sweep removes those that no VM of this host uses (its VM records name their
 *   disks) and no live process has open on its command line (a committed incoming move's QEMU, which
 *   the migration service re-adopts, keeps its disk);
 * - previous disks (`<vm>.prev.qcow2`, kept when a VM moves away so that a move back sends only what
 *   changed, vm/disk/previous.ts): like the RAM a host keeps as chunks after a move (one pinned manifest
 *   per VM, bounded by the chunk store's size), one per VM, and all of them together within a budget:
 *   `MESH_PREV_DISKS_MAX` (bytes, or with a K/M/G/T suffix; 0 keeps none), by default a quarter of the
 *   file system the disks live on. Over budget, the oldest (the VM that left longest ago) go first. A
 *   pruned previous disk only makes a later return move send more; it is never the VM's own disk.
 */
import { readdir, readFile, rm, stat, statfs } from 'node:fs/promises'
import { join } from 'node:path'
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

/**
 * Removes incoming disks nothing uses (see above) and sockets of previous-disk readers whose process is
 * gone. `inUse`: the disks of this host's VMs (running or not). Returns the removed paths.
 */
export async function sweepIncomingDisks(diskDir: string, inUse: ReadonlySet<string>): Promise<string[]> {
  const removed: string[] = []
  const names = await readdir(diskDir).catch(() => [] as string[])
  const candidates = names.filter((n) => INCOMING_RE.test(n)).map((n) => join(diskDir, n))
  const open = candidates.length > 0 ? await commandLines() : []
  for (const path of candidates) {
    if (inUse.has(path) || open.some((c) => c.includes(path))) continue
    await rm(path, { force: true })
    removed.push(path)
  }
  for (const n of names) {
    const m = PREV_SOCK_RE.exec(n)
    if (m !== null && !processAlive(Number(m[1]))) {
      await rm(join(diskDir, n), { force: true })
      removed.push(join(diskDir, n))
    }
  }
  return removed
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
