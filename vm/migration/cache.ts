import { createHash } from 'node:crypto'
import { closeSync, openSync, readSync } from 'node:fs'
import { ChunkVerifyError } from '../../net/chunks/errors.ts'
import { hashEquals, sha256 } from '../../net/chunks/hash.ts'
import type { ChunkStore } from '../../net/chunks/interfaces.ts'
import { buildManifest } from '../../net/chunks/manifest.ts'
import { onAbort } from '../../src/base/abort.ts'
import type { RamCache, RememberOptions } from './interfaces.ts'

const PIN = (vm: string) => `migration/ram/${vm}`

/**
 * RAM kept in the host's chunk store: the last RAM of each VM that moved away is a manifest pinned
 * under `migration/ram/<vm>` (so the store's GC keeps its chunks until the VM comes back or a newer
 * copy replaces it). Reads verify every chunk.
 */
export function createStoreRamCache(store: ChunkStore): RamCache {
  const remembering = rememberQueue(async (vm, ramPath, chunkSize, signal) => {
    await buildManifest(ramPath, { store, chunkSize, pin: PIN(vm), ...(signal ? { signal } : {}) })
  })
  return {
    has: (hash) => store.has(hash),
    async get(hash) {
      // Checked here too, whatever the store's own policy: these bytes go straight into a guest's RAM.
      const data = await store.get(hash)
      if (!hashEquals(sha256(data), hash))
        throw new ChunkVerifyError(
          `cached RAM chunk ${Buffer.from(hash).toString('hex')} does not match its hash`,
        )
      return data
    },
    remember: remembering.remember,
    settled: remembering.settled,
    async forget(vm) {
      if (store.pins().has(PIN(vm))) await store.unpin(PIN(vm))
    },
  }
}

type RememberNow = (vm: string, ramPath: string, chunkSize: number, signal?: AbortSignal) => Promise<void>

/** remember() with an optional delay, one per VM, that settled() brings forward and waits for. */
function rememberQueue(now: RememberNow): Pick<RamCache, 'remember' | 'settled'> {
  const pending = new Map<string, { start: () => void; done: Promise<void> }>()
  return {
    remember(vm, ramPath, chunkSize, options: RememberOptions = {}) {
      let start!: () => void
      const gate = new Promise<void>((resolve) => {
        start = resolve
      })
      const timer = options.delayMs ? setTimeout(start, options.delayMs) : undefined
      if (timer === undefined) start()
      const abortNow = () => start() // an aborted wait ends now; `now` then sees the aborted signal
      const offAbort = onAbort(options.signal, abortNow)
      const done = gate
        .then(() => {
          options.signal?.throwIfAborted() // aborted during the delay: no work at all
          return now(vm, ramPath, chunkSize, options.signal)
        })
        .finally(() => {
          clearTimeout(timer)
          offAbort()
          if (pending.get(vm)?.done === done) pending.delete(vm)
        })
      pending.set(vm, { start, done })
      return done
    },
    async settled(vm) {
      const p = pending.get(vm)
      if (p === undefined) return
      p.start()
      // Its failure is the rememberer's to report (the source logs it); here only "no longer running" counts.
      await p.done.catch(() => {})
    },
  }
}

/** The same in memory (unit tests): chunks by hex hash, per VM. */
export function createMemoryRamCache(): RamCache & { chunks(): number } {
  const byVm = new Map<string, Map<string, Buffer>>()
  const remembering = rememberQueue(async (vm, ramPath, chunkSize) => {
    const m = new Map<string, Buffer>()
    const fd = openSync(ramPath, 'r')
    try {
      const zero = Buffer.alloc(chunkSize)
      for (let pos = 0; ; pos += chunkSize) {
        const b = Buffer.alloc(chunkSize)
        const n = readSync(fd, b, 0, chunkSize, pos)
        if (n === 0) break
        if (b.equals(zero)) continue
        m.set(createHash('sha256').update(b).digest('hex'), b)
      }
    } finally {
      closeSync(fd)
    }
    byVm.set(vm, m)
  })
  const find = (hex: string): Buffer | undefined => {
    for (const m of byVm.values()) {
      const b = m.get(hex)
      if (b !== undefined) return b
    }
    return undefined
  }
  return {
    has: (hash) => find(Buffer.from(hash).toString('hex')) !== undefined,
    async get(hash) {
      const b = find(Buffer.from(hash).toString('hex'))
      if (b === undefined) throw new Error('not in the cache')
      return b
    },
    remember: remembering.remember,
    settled: remembering.settled,
    async forget(vm) {
      byVm.delete(vm)
    },
    chunks: () => [...byVm.values()].reduce((n, m) => n + m.size, 0),
  }
}
