import { type FileHandle, open } from 'node:fs/promises'
import { throwIfAborted } from '../../src/base/errors.ts'
import type { DirtyRound, DirtyTracker } from '../driver/interfaces.ts'

/** Read granularity: big enough to amortise syscalls, small enough not to double the memory cost. */
const READ_BLOCK = 4 * 1024 * 1024

/**
 * Dirty tracking that works on every kernel: keep a copy of the file as of the last round and compare
 * each chunk against it (Buffer.compare is a memcmp). Costs one extra copy of the RAM in this process
 * and about one read of the file per round. Chunks whose bytes changed and changed back count as clean,
 * which is what migration wants (the destination already holds those bytes).
 */
export class CompareDirtyTracker implements DirtyTracker {
  readonly method = 'compare'
  readonly chunkSize: number
  private retained: Buffer | undefined
  private lastAt = 0
  private busy = false

  constructor(
    private readonly path: string,
    private readonly size: number,
    chunkSize = 64 * 1024,
  ) {
    if (chunkSize <= 0 || chunkSize % 4096 !== 0 || READ_BLOCK % chunkSize !== 0) {
      throw new RangeError(`chunk size must be a multiple of 4 KiB dividing ${READ_BLOCK}, got ${chunkSize}`)
    }
    this.chunkSize = chunkSize
  }

  async start(signal?: AbortSignal): Promise<void> {
    this.retained ??= Buffer.allocUnsafeSlow(this.size)
    await this.scan(this.retained, signal, true)
    this.lastAt = performance.now()
  }

  async collect(signal?: AbortSignal): Promise<DirtyRound> {
    if (this.retained === undefined) throw new Error('DirtyTracker.collect() before start()')
    const t0 = performance.now()
    const chunks = await this.scan(this.retained, signal, false)
    const now = performance.now()
    const intervalMs = Math.max(now - this.lastAt, 0.001)
    this.lastAt = now
    const dirtyBytes = chunks.length * this.chunkSize
    return {
      chunks,
      chunkSize: this.chunkSize,
      dirtyBytes,
      intervalMs,
      rateBytesPerSec: (dirtyBytes * 1000) / intervalMs,
      scanMs: now - t0,
    }
  }

  async close(): Promise<void> {
    this.retained = undefined
  }

  /** Reads the file block by block; compares (or, for the baseline, copies) chunk by chunk. */
  private async scan(
    retained: Buffer,
    signal: AbortSignal | undefined,
    baseline: boolean,
  ): Promise<number[]> {
    if (this.busy) throw new Error('DirtyTracker: start()/collect() already running')
    this.busy = true
    const fh = await open(this.path, 'r')
    const dirty: number[] = []
    const scratch = baseline ? undefined : Buffer.allocUnsafe(Math.min(READ_BLOCK, this.size))
    try {
      for (let off = 0; off < this.size; off += READ_BLOCK) {
        throwIfAborted(signal)
        const len = Math.min(READ_BLOCK, this.size - off)
        if (scratch === undefined) {
          await readFully(fh, retained, off, len, off)
          continue
        }
        await readFully(fh, scratch, 0, len, off)
        for (let c = 0; c < len; c += this.chunkSize) {
          const end = Math.min(c + this.chunkSize, len)
          if (scratch.compare(retained, off + c, off + end, c, end) !== 0) {
            dirty.push((off + c) / this.chunkSize)
            scratch.copy(retained, off + c, c, end)
          }
        }
      }
    } finally {
      this.busy = false
      await fh.close()
    }
    return dirty
  }
}

/** pread until `len` bytes; a short file reads as zeros (a sparse or truncated RAM file). */
async function readFully(
  fh: FileHandle,
  buf: Buffer,
  bufOff: number,
  len: number,
  filePos: number,
): Promise<void> {
  let done = 0
  while (done < len) {
    const { bytesRead } = await fh.read(buf, bufOff + done, len - done, filePos + done)
    if (bytesRead === 0) {
      buf.fill(0, bufOff + done, bufOff + len)
      return
    }
    done += bytesRead
  }
}
