import { EventEmitter } from 'node:events'
import { open, stat } from 'node:fs/promises'
import type { VmEventName, VmEvents } from './interfaces.ts'

/** Typed event helpers shared by the drivers' Vm classes. */
export class VmEmitter extends EventEmitter {
  protected fire<K extends VmEventName>(event: K, payload: VmEvents[K]): void {
    this.emit(event, payload)
  }
}

/** The last `n` non-empty lines of a text file (reads at most the last 64 KiB); [] when missing. */
export async function tailLines(path: string, n: number): Promise<string[]> {
  try {
    const st = await stat(path)
    const len = Math.min(st.size, 64 * 1024)
    const fh = await open(path, 'r')
    try {
      const buf = Buffer.alloc(len)
      await fh.read(buf, 0, len, st.size - len)
      return buf
        .toString('utf8')
        .split(/\r?\n/)
        .map((l) => l.trimEnd())
        .filter((l) => l !== '')
        .slice(-n)
    } finally {
      await fh.close()
    }
  } catch {
    return []
  }
}
