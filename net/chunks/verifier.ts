import { availableParallelism } from 'node:os'
import { Worker } from 'node:worker_threads'
import { hashEquals, sha256 } from './hash.ts'

/**
 * Checks received blocks against their names off the main thread. On a fast path the puller's main
 * thread spent ~17% of its time in SHA-256 (bench wan --cpu-prof, lan); a worker hashes while the
 * main thread decrypts and parses the next messages. Nothing is stored or used before verify() said
 * so; a worker that fails makes the rest verify inline.
 *
 * The bytes reach the worker without a copy when the caller owns the whole buffer they lie in (a
 * BLOCKS message reassembled from several noise frames is its own ArrayBuffer): it is transferred
 * and comes back, and the result holds new views of the same bytes. Otherwise they are copied into
 * a pooled SharedArrayBuffer (a memcpy is about a tenth of the hash).
 */

export interface VerifyItem {
  hash: Uint8Array
  data: Uint8Array
}

export interface Verified {
  /** Per item: sha256(data) equals hash. */
  ok: boolean[]
  /** The items' bytes: the same views, or new views of the same memory if it was transferred. */
  data: Uint8Array[]
  /** The bytes went with a worker that died: nothing was checked (ok all false); ask again. */
  lost?: boolean
}

export interface BlockVerifier {
  /**
   * Hashes every item. With `owner` (the buffer the items lie in, e.g. the received message) the
   * memory may be transferred to a worker and back: the caller must not touch `owner` nor the items'
   * old views until the promise resolves, and uses `data` afterwards.
   */
  verify(items: readonly VerifyItem[], owner?: Uint8Array): Promise<Verified>
  close(): void
}
/** Less than this many bytes in one call: hashed inline (a worker round trip costs ~50–100 µs). */
const INLINE_BYTES = 48 * 1024
/** Shared buffers kept for reuse (each the size of the largest call seen, ≤ a link message). */
const POOL_MAX = 32

// Plain JavaScript, evaluated: the worker must not depend on how the agent loads TypeScript.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads')
const { createHash } = require('node:crypto')
parentPort.on('message', ({ id, buf, items }) => {
  const ok = []
  for (const [hashAt, dataAt, len] of items) {
    const digest = createHash('sha256').update(new Uint8Array(buf, dataAt, len)).digest()
    ok.push(digest.equals(new Uint8Array(buf, hashAt, 32)))
  }
  // A transferred buffer goes back to its owner; a shared one is only referenced.
  parentPort.postMessage({ id, ok, buf }, buf instanceof ArrayBuffer ? [buf] : [])
})
`

/** Hashes in the calling thread: the fallback, and the choice on a single core. */
export const inlineVerifier: BlockVerifier = {
  verify: (items) =>
    Promise.resolve({
      ok: items.map((it) => it.hash.byteLength === 32 && hashEquals(sha256(it.data), it.hash)),
      data: items.map((it) => it.data),
    }),
  close: () => {},
}

/**
 * `threads` workers (default: cores − 2, at most 2: none on this 2-core box). A worker takes ~0.45 ms
 * per MB off the main thread but costs ~0.1–0.2 ms per MB more in all (messages, wake-ups; copies
 * when the bytes cannot move): a win only where a core is spare. On 2 cores shared by the puller, the
 * holder and the kernel's forwarding, every process is already waiting for a core (profiles: main
 * threads 40–60% idle at lan speed), so the total is what counts there.
 */
export function createBlockVerifier(options: { threads?: number } = {}): BlockVerifier {
  const threads = options.threads ?? Math.min(2, availableParallelism() - 2)
  return threads >= 1 ? new WorkerVerifier(threads) : inlineVerifier
}

interface Waiting {
  /** Pooled shared buffer to give back, if the bytes were copied. */
  sab: SharedArrayBuffer | undefined
  /** Where the items' bytes lie in a transferred buffer: [offset, length]. */
  moved: [number, number][] | undefined
  resolve(v: Verified): void
  items: readonly VerifyItem[]
  worker: number
}

class WorkerVerifier implements BlockVerifier {
  private readonly workers: (Worker | undefined)[] = []
  private readonly load: number[] = []
  private readonly waiting = new Map<number, Waiting>()
  private readonly pool: SharedArrayBuffer[] = []
  private seq = 0
  private closed = false

  constructor(private readonly threads: number) {}

  private start(k: number): Worker {
    const w = new Worker(WORKER_SOURCE, { eval: true, execArgv: [] })
    // Never keeps the agent alive; an idle worker costs nothing.
    w.unref()
    w.on('message', (m: { id: number; ok: boolean[]; buf: ArrayBuffer | SharedArrayBuffer }) => {
      const p = this.waiting.get(m.id)
      if (p === undefined) return
      this.waiting.delete(m.id)
      this.load[k]!--
      if (p.sab !== undefined) this.release(p.sab)
      const data =
        p.moved === undefined
          ? p.items.map((it) => it.data)
          : p.moved.map(([at, len]) => Buffer.from(m.buf as ArrayBuffer, at, len))
      p.resolve({ ok: m.ok, data })
    })
    const fail = () => {
      if (this.workers[k] !== w) return
      this.workers[k] = undefined
      this.load[k] = 0
      // What this worker still owed is hashed here; the next call starts a fresh worker.
      for (const [id, p] of [...this.waiting]) {
        if (p.worker !== k) continue
        this.waiting.delete(id)
        this.settleLost(p)
      }
    }
    w.on('error', fail)
    w.on('exit', fail)
    this.workers[k] = w
    this.load[k] = 0
    return w
  }

  private take(bytes: number): SharedArrayBuffer {
    for (let i = this.pool.length - 1; i >= 0; i--) {
      if (this.pool[i]!.byteLength >= bytes) return this.pool.splice(i, 1)[0]!
    }
    return new SharedArrayBuffer(Math.max(bytes, 256 * 1024 + 4096))
  }

  private release(sab: SharedArrayBuffer): void {
    if (!this.closed && this.pool.length < POOL_MAX) this.pool.push(sab)
  }

  /** A worker died with this call: copied bytes are hashed here; transferred ones went with it, so
   *  those items fail (the fetch asks for them again from another member). */
  private settleLost(p: Waiting): void {
    if (p.moved === undefined) void inlineVerifier.verify(p.items).then(p.resolve)
    else p.resolve({ ok: p.items.map(() => false), data: p.items.map(() => new Uint8Array(0)), lost: true })
  }

  verify(items: readonly VerifyItem[], owner?: Uint8Array): Promise<Verified> {
    let bytes = 0
    for (const it of items) bytes += it.data.byteLength + 32
    if (this.closed || bytes < INLINE_BYTES || items.some((it) => it.hash.byteLength !== 32))
      return inlineVerifier.verify(items)
    // The least busy worker (round robin among equals).
    let k = 0
    for (let j = 1; j < this.threads; j++) if ((this.load[j] ?? 0) < (this.load[k] ?? 0)) k = j
    const worker = this.workers[k] ?? this.start(k)
    const buf = owner?.buffer
    const spec: [number, number, number][] = []
    let sab: SharedArrayBuffer | undefined
    let moved: [number, number][] | undefined
    if (
      buf instanceof ArrayBuffer &&
      owner!.byteOffset === 0 &&
      owner!.byteLength === buf.byteLength &&
      items.every((it) => it.hash.buffer === buf && it.data.buffer === buf)
    ) {
      moved = items.map((it) => [it.data.byteOffset, it.data.byteLength])
      for (const it of items) spec.push([it.hash.byteOffset, it.data.byteOffset, it.data.byteLength])
    } else {
      sab = this.take(bytes)
      const view = new Uint8Array(sab)
      let at = 0
      for (const it of items) {
        view.set(it.hash, at)
        view.set(it.data, at + 32)
        spec.push([at, at + 32, it.data.byteLength])
        at += 32 + it.data.byteLength
      }
    }
    const id = ++this.seq
    return new Promise<Verified>((resolve) => {
      this.waiting.set(id, { sab, moved, resolve, items, worker: k })
      this.load[k]!++
      if (moved === undefined) {
        worker.postMessage({ id, buf: sab, items: spec })
        return
      }
      try {
        worker.postMessage({ id, buf, items: spec }, [buf as ArrayBuffer])
      } catch {
        // Not detachable (e.g. memory a native addon lent): hashed here instead, nothing was moved.
        this.waiting.delete(id)
        this.load[k]!--
        void inlineVerifier.verify(items).then(resolve)
      }
    })
  }

  close(): void {
    this.closed = true
    this.pool.length = 0
    for (const w of this.workers) void w?.terminate()
    this.workers.length = 0
    // Anything still waiting is hashed here (terminate() fires 'exit' too, but close must not depend on it).
    for (const [id, p] of [...this.waiting]) {
      this.waiting.delete(id)
      this.settleLost(p)
    }
  }
}
