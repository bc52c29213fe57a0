import { closeSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs'
import { open, readFile, writeFile } from 'node:fs/promises'
import { throwIfAborted } from '../../src/base/errors.ts'
import type { DirtyRound, DirtyTracker } from '../driver/interfaces.ts'

const PAGE = 4096
const SOFT_DIRTY = 1n << 55n

let detected: boolean | undefined

/**
 * Whether this kernel keeps soft-dirty bits (CONFIG_MEM_SOFT_DIRTY). Not assumed from the kernel
 * version: on kernels without it /proc/PID/clear_refs accepts `4` but bit 55 of pagemap is never set.
 * So we clear our own bits, write a fresh buffer, and look for any page of ours with the bit set.
 * The result is cached; `MESH_DIRTY_METHOD=compare|soft-dirty` forces a method.
 */
export function softDirtySupported(): boolean {
  if (process.env.MESH_DIRTY_METHOD === 'compare') return false
  // Tests of the freeze logic on kernels without the bits (every round then reports nothing).
  if (process.env.MESH_DIRTY_METHOD === 'soft-dirty') return true
  if (detected !== undefined) return detected
  detected = false
  try {
    writeFileSync('/proc/self/clear_refs', '4')
    // Touch a few MiB so that pages of ours certainly get written after the clear.
    const probe = Buffer.alloc(4 * 1024 * 1024)
    for (let i = 0; i < probe.length; i += PAGE) probe[i] = 1
    detected = anySoftDirty(readFileSync('/proc/self/maps', 'utf8'))
  } catch {
    detected = false
  }
  return detected
}

/** Looks at up to 4096 pages of each writable mapping of this process for a soft-dirty bit. */
function anySoftDirty(maps: string): boolean {
  const fd = openSync('/proc/self/pagemap', 'r')
  try {
    for (const line of maps.split('\n')) {
      const m = /^([0-9a-f]+)-([0-9a-f]+) rw/.exec(line)
      if (m === null) continue
      const start = BigInt(`0x${m[1]}`)
      const pages = Number((BigInt(`0x${m[2]}`) - start) / BigInt(PAGE))
      const buf = Buffer.alloc(Math.min(pages, 4096) * 8)
      let got = 0
      try {
        got = readSync(fd, buf, 0, buf.length, Number((start / BigInt(PAGE)) * 8n))
      } catch {
        continue // [vsyscall] and friends cannot be read
      }
      for (let i = 0; i + 8 <= got; i += 8) {
        if ((buf.readBigUInt64LE(i) & SOFT_DIRTY) !== 0n) return true
      }
    }
    return false
  } finally {
    closeSync(fd)
  }
}

/**
 * Dirty tracking with the kernel's soft-dirty bits on the hypervisor's mapping of the RAM file: clear
 * the bits (`4` → /proc/PID/clear_refs), later read /proc/PID/pagemap for the mapping. Reading the
 * bits and clearing them is not atomic, so a page written in between would be lost; `freeze` must
 * therefore hold the guest's CPUs still around each collect (a pause of a few ms).
 */
export class SoftDirtyTracker implements DirtyTracker {
  readonly method = 'soft-dirty'
  readonly chunkSize: number
  private lastAt = 0
  private started = false

  constructor(
    private readonly pid: number,
    private readonly path: string,
    private readonly size: number,
    private readonly freeze: <T>(fn: () => Promise<T>) => Promise<T>,
    chunkSize = 64 * 1024,
    /** Tests point this at a fake /proc. */
    private readonly procRoot = '/proc',
  ) {
    if (chunkSize <= 0 || chunkSize % PAGE !== 0)
      throw new RangeError(`chunk size must be a multiple of 4 KiB`)
    this.chunkSize = chunkSize
  }

  async start(signal?: AbortSignal): Promise<void> {
    throwIfAborted(signal)
    await this.freeze(() => writeFile(`${this.procRoot}/${this.pid}/clear_refs`, '4'))
    this.started = true
    this.lastAt = performance.now()
  }

  async collect(signal?: AbortSignal): Promise<DirtyRound> {
    if (!this.started) throw new Error('DirtyTracker.collect() before start()')
    throwIfAborted(signal)
    const t0 = performance.now()
    const dirty = await this.freeze(async () => {
      const found = await this.readDirty()
      await writeFile(`${this.procRoot}/${this.pid}/clear_refs`, '4')
      return found
    })
    const now = performance.now()
    const intervalMs = Math.max(now - this.lastAt, 0.001)
    this.lastAt = now
    const dirtyBytes = dirty.length * this.chunkSize
    return {
      chunks: dirty,
      chunkSize: this.chunkSize,
      dirtyBytes,
      intervalMs,
      rateBytesPerSec: (dirtyBytes * 1000) / intervalMs,
      scanMs: now - t0,
    }
  }

  async close(): Promise<void> {
    this.started = false
  }

  /** Chunk indices with at least one soft-dirty page in any mapping of the RAM file. */
  private async readDirty(): Promise<number[]> {
    const maps = await readFile(`${this.procRoot}/${this.pid}/maps`, 'utf8')
    const set = new Set<number>()
    const fh = await open(`${this.procRoot}/${this.pid}/pagemap`, 'r')
    try {
      for (const line of maps.split('\n')) {
        // start-end perms offset dev inode path
        const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \d+\s+(.*)$/.exec(line)
        if (m === null || m[4] !== this.path) continue
        const start = BigInt(`0x${m[1]}`)
        const pages = Number((BigInt(`0x${m[2]}`) - start) / BigInt(PAGE))
        const fileOff = Number.parseInt(m[3]!, 16)
        const buf = Buffer.alloc(pages * 8)
        const { bytesRead } = await fh.read(buf, 0, buf.length, Number((start / BigInt(PAGE)) * 8n))
        for (let i = 0; i * 8 + 8 <= bytesRead; i++) {
          if ((buf.readBigUInt64LE(i * 8) & SOFT_DIRTY) === 0n) continue
          const off = fileOff + i * PAGE
          if (off < this.size) set.add(Math.floor(off / this.chunkSize))
        }
      }
    } finally {
      await fh.close()
    }
    return [...set].sort((a, b) => a - b)
  }
}
