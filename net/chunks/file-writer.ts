import type { FileHandle } from 'node:fs/promises'

/* The puller's output file (a fetch's `file` or `inPlace` target). */

/**
 * Positional writes into the fetch's file, batched: everything queued in one turn of the event loop
 * is sorted and written as runs of adjacent chunks, one writev each (async fs calls cost ~70 µs each
 * here whatever their size; one per 64 KiB chunk was a large share of a pull's CPU).
 */
export class FileWriter {
  private queue: { pos: number; data: Uint8Array; resolve(): void; reject(e: Error): void }[] = []
  private running = false

  constructor(private readonly fh: FileHandle) {}

  write(pos: number, data: Uint8Array): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ pos, data, resolve, reject })
      if (!this.running) {
        this.running = true
        setImmediate(() => void this.flush())
      }
    })
  }

  private async flush(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue.sort((a, b) => a.pos - b.pos)
      this.queue = []
      let k = 0
      while (k < batch.length) {
        let end = k + 1
        let next = batch[k]!.pos + batch[k]!.data.byteLength
        while (end < batch.length && batch[end]!.pos === next && end - k < 1000) {
          next += batch[end]!.data.byteLength
          end++
        }
        const run = batch.slice(k, end)
        try {
          await writeAll(
            this.fh,
            run.map((r) => r.data),
            run[0]!.pos,
          )
          for (const r of run) r.resolve()
        } catch (err) {
          for (const r of run) r.reject(err instanceof Error ? err : new Error(String(err)))
        }
        k = end
      }
    }
    this.running = false
  }
}

async function writeAll(fh: FileHandle, bufs: Uint8Array[], pos: number): Promise<void> {
  const total = bufs.reduce((s, b) => s + b.byteLength, 0)
  let written = (await fh.writev(bufs, pos)).bytesWritten
  if (written >= total) return
  // Short writev (rare on regular files): write the rest from a joined copy.
  const rest = Buffer.concat(bufs).subarray(written)
  let off = 0
  while (written < total) {
    const n = (await fh.write(rest, off, rest.byteLength - off, pos + written)).bytesWritten
    written += n
    off += n
  }
}

let zeros = Buffer.alloc(0)
export function zeroBuffer(len: number): Buffer {
  if (zeros.byteLength < len) zeros = Buffer.alloc(len)
  return zeros
}
