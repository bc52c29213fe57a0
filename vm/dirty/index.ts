import type { DirtyTracker } from '../driver/interfaces.ts'
import { CompareDirtyTracker } from './compare.ts'
import { SoftDirtyTracker, softDirtySupported } from './softdirty.ts'

export { CompareDirtyTracker } from './compare.ts'
export { SoftDirtyTracker, softDirtySupported } from './softdirty.ts'

export interface DirtySource {
  /** The RAM file. */
  path: string
  size: number
  /** The process that maps the file shared; soft-dirty needs it. */
  pid?: number
  /** Holds the guest still while soft-dirty bits are read and cleared (see SoftDirtyTracker). */
  freeze?: <T>(fn: () => Promise<T>) => Promise<T>
}

/** Soft-dirty when the kernel has it and we know the process, else comparison with the last round. */
export function createDirtyTracker(
  source: DirtySource,
  chunkSize = 64 * 1024,
  method: 'auto' | 'compare' = 'auto',
): DirtyTracker {
  if (method === 'auto' && source.pid !== undefined && source.freeze !== undefined && softDirtySupported()) {
    return new SoftDirtyTracker(source.pid, source.path, source.size, source.freeze, chunkSize)
  }
  return new CompareDirtyTracker(source.path, source.size, chunkSize)
}
