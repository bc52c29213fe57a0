/**
 * The destination's side of post-copy as Node sees it: a `mesh-uffd` child process (uffd-helper.c)
 * that holds a userfaultfd on the incoming QEMU's RAM mapping. The migration hands it the owed chunks
 * (punched out of the RAM file), learns which of them the guest touches first (onFault), and places
 * chunks as they arrive from the source (fill). Until finish() every owed chunk the guest touches
 * blocks the touching thread, never reads zeros.
 *
 * The helper is built from its C source (uffd-helper-source.ts) with gcc on first use and cached
 * (ensureUffdHelper); a host
 * without gcc or userfaultfd simply cannot receive post-copy moves (postcopySupport() says why).
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { accessSync, constants, existsSync } from 'node:fs'
import { chmod, mkdir, rename, rm, writeFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError, describeError, MeshError } from '../../src/base/errors.ts'
import { UFFD_HELPER_SOURCE } from './uffd-helper-source.ts'

const execFileAsync = promisify(execFile)

/** Post-copy cannot run here, or the pager failed (its message says why). */
export class PostcopyError extends MeshError {
  constructor(message: string, options: { cause?: unknown; code?: string } = {}) {
    super(message, { cause: options.cause, code: options.code ?? 'E_POSTCOPY' })
  }
}

function cacheDir(): string {
  const base = process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache')
  return join(base, 'mesh', 'bin')
}

let built: Promise<string> | undefined

/**
 * The pager binary: $MESH_UFFD_HELPER when set, else compiled from its C source into the cache (named
 * by the source's hash, so a changed source is rebuilt; written under a temporary name and renamed, so
 * two agents building at once never run a half-written file).
 */
export function ensureUffdHelper(): Promise<string> {
  built ??= (async () => {
    const env = process.env.MESH_UFFD_HELPER
    if (env !== undefined && env !== '') {
      accessSync(env, constants.X_OK)
      return env
    }
    const hash = createHash('sha256').update(UFFD_HELPER_SOURCE).digest('hex').slice(0, 16)
    const dir = cacheDir()
    const bin = join(dir, `mesh-uffd-${hash}`)
    if (existsSync(bin)) return bin
    await mkdir(dir, { recursive: true })
    const tmp = `${bin}.${process.pid}.tmp`
    const src = `${tmp}.c`
    try {
      await writeFile(src, UFFD_HELPER_SOURCE)
      await execFileAsync('gcc', ['-O2', '-Wall', '-o', tmp, src], { timeout: 120_000 })
      await chmod(tmp, 0o755)
      await rename(tmp, bin)
    } catch (err) {
      await rm(tmp, { force: true })
      throw new PostcopyError(`cannot build the post-copy pager (gcc): ${describeError(err)}`, { cause: err })
    } finally {
      await rm(src, { force: true })
    }
    return bin
  })()
  built.catch(() => {
    built = undefined
  })
  return built
}

/** Whether this host can be the destination of a post-copy move, and why not. */
export async function postcopySupport(): Promise<{ ok: true } | { ok: false; reason: string }> {
  if (process.platform !== 'linux' || process.arch !== 'x64')
    return {
      ok: false,
      reason: `post-copy needs Linux on x86-64 (this is ${process.platform}/${process.arch})`,
    }
  if (process.getuid?.() !== 0)
    return { ok: false, reason: 'post-copy needs root (ptrace and userfaultfd on QEMU)' }
  try {
    await ensureUffdHelper()
    return { ok: true }
  } catch (err) {
    return { ok: false, reason: describeError(err) }
  }
}

export interface PagerStats {
  /** Owed chunks the guest touched before they arrived. */
  owedFaults: number
  /** First touches of pages that are zero (answered by the pager at once). */
  zeroFaults: number
  filledChunks: number
  /** Longest and total time a faulting guest thread waited for its chunk, µs. */
  maxWaitUs: number
  totalWaitUs: number
}

export interface Pager {
  /** The uffd's descriptor number inside QEMU (persist it: a restarted agent takes the uffd back). */
  readonly qemuFd: number
  readonly regrabbed: boolean
  /**
   * Owed chunks: fresh, they are punched out of the RAM file; taken back, those still holes stay owed.
   * Resolves with how many are owed now and their bitmap.
   */
  owe(bitmap: Uint8Array): Promise<{ count: number; bitmap: Uint8Array }>
  /** Places one chunk. false = the pipe is full: wait for drain(). */
  fill(chunk: number, bytes: Uint8Array): boolean
  drain(): Promise<void>
  /** The first touch of an owed chunk (once per chunk). */
  onFault(handler: (chunk: number) => void): () => void
  /** Every owed chunk was filled: the pager unregisters and ends. */
  finish(): Promise<PagerStats>
  /** Ends the pager now without unregistering (the VM is being stopped, or the agent hands over). */
  quit(): Promise<void>
  /** Rejects when the pager dies or reports an error. */
  readonly failed: Promise<never>
}

export interface PagerOptions {
  pid: number
  ramPath: string
  ramBytes: number
  chunkBytes: number
  /** Take back the uffd a previous pager left in QEMU (its descriptor number there). */
  regrabFd?: number
  signal?: AbortSignal
}

const HEADER = 5

class UffdPager implements Pager {
  qemuFd = -1
  regrabbed = false
  readonly failed: Promise<never>
  private fail!: (e: Error) => void
  private inbox: Buffer = Buffer.alloc(0)
  private readonly waiters = new Map<string, { resolve: (p: Buffer) => void; reject: (e: Error) => void }>()
  private readonly faultHandlers = new Set<(chunk: number) => void>()
  private error: Error | undefined
  private ended = false

  constructor(private readonly child: ChildProcess) {
    this.failed = new Promise<never>((_, reject) => {
      this.fail = reject
    })
    this.failed.catch(() => {})
    let stderr = ''
    child.stderr?.on('data', (b: Buffer) => {
      stderr = (stderr + b.toString()).slice(-2000)
    })
    child.stdout?.on('data', (b: Buffer) => this.onData(b))
    child.on('error', (err) => this.die(new PostcopyError(`post-copy pager: ${err.message}`, { cause: err })))
    child.on('exit', (code, sig) => {
      if (this.ended && code === 0) return
      this.die(
        new PostcopyError(
          `post-copy pager exited (${sig ?? code})${stderr.trim() === '' ? '' : `: ${stderr.trim().split('\n').at(-1)}`}`,
        ),
      )
    })
    child.stdin?.on('error', () => {})
  }

  private die(err: Error): void {
    if (this.error !== undefined) return
    this.error = err
    for (const w of this.waiters.values()) w.reject(err)
    this.waiters.clear()
    this.fail(err)
  }

  private onData(b: Buffer): void {
    this.inbox = this.inbox.byteLength === 0 ? b : Buffer.concat([this.inbox, b])
    while (this.inbox.byteLength >= HEADER) {
      const len = this.inbox.readUInt32LE(1)
      if (this.inbox.byteLength < HEADER + len) break
      const type = String.fromCharCode(this.inbox[0]!)
      const payload = this.inbox.subarray(HEADER, HEADER + len)
      this.inbox = this.inbox.subarray(HEADER + len)
      if (type === 'P') {
        const chunk = payload.readUInt32LE(0)
        for (const h of this.faultHandlers) h(chunk)
      } else if (type === 'E') {
        this.die(new PostcopyError(`post-copy pager: ${payload.toString('utf8')}`))
      } else {
        const w = this.waiters.get(type)
        this.waiters.delete(type)
        w?.resolve(Buffer.from(payload))
      }
    }
  }

  expect(type: string): Promise<Buffer> {
    if (this.error !== undefined) return Promise.reject(this.error)
    return new Promise((resolve, reject) => this.waiters.set(type, { resolve, reject }))
  }

  private send(type: string, payload: Uint8Array, extra?: Uint8Array): boolean {
    if (this.error !== undefined) throw this.error
    const h = Buffer.allocUnsafe(HEADER)
    h[0] = type.charCodeAt(0)
    h.writeUInt32LE(payload.byteLength + (extra?.byteLength ?? 0), 1)
    const stdin = this.child.stdin!
    stdin.write(h)
    if (extra === undefined) return stdin.write(payload)
    stdin.write(payload)
    return stdin.write(extra)
  }

  async owe(bitmap: Uint8Array): Promise<{ count: number; bitmap: Uint8Array }> {
    const r = this.expect('R')
    this.send('O', bitmap)
    const p = await r
    return { count: p.readUInt32LE(0), bitmap: new Uint8Array(p.subarray(4)) }
  }

  fill(chunk: number, bytes: Uint8Array): boolean {
    const idx = Buffer.allocUnsafe(4)
    idx.writeUInt32LE(chunk, 0)
    return this.send('F', idx, bytes)
  }

  drain(): Promise<void> {
    if (this.error !== undefined) return Promise.reject(this.error)
    const stdin = this.child.stdin!
    if (!stdin.writableNeedDrain) return Promise.resolve()
    return Promise.race([new Promise<void>((resolve) => stdin.once('drain', () => resolve())), this.failed])
  }

  onFault(handler: (chunk: number) => void): () => void {
    this.faultHandlers.add(handler)
    return () => this.faultHandlers.delete(handler)
  }

  async finish(): Promise<PagerStats> {
    const d = this.expect('D')
    this.ended = true
    this.send('X', new Uint8Array(0))
    const p = await d
    const n = (o: number) => Number(p.readBigUInt64LE(o))
    return { owedFaults: n(0), zeroFaults: n(8), filledChunks: n(16), maxWaitUs: n(24), totalWaitUs: n(32) }
  }

  async quit(): Promise<void> {
    this.ended = true
    if (this.child.exitCode !== null || this.child.signalCode !== null) return
    const gone = new Promise<void>((resolve) => this.child.once('exit', () => resolve()))
    try {
      this.send('Q', new Uint8Array(0))
    } catch {
      // already failed: it is going away
    }
    this.child.stdin?.end()
    const t = setTimeout(() => this.child.kill('SIGKILL'), 5000)
    await gone
    clearTimeout(t)
  }
}

/** Starts a pager on the QEMU process `pid` (injecting the uffd, or taking it back with regrabFd). */
export async function startPager(o: PagerOptions): Promise<Pager> {
  if (o.signal?.aborted === true) throw new AbortError()
  const bin = await ensureUffdHelper()
  const args = [String(o.pid), o.ramPath, String(o.ramBytes), String(o.chunkBytes)]
  if (o.regrabFd !== undefined) args.push('--fd', String(o.regrabFd))
  const child = spawn(bin, args, { stdio: ['pipe', 'pipe', 'pipe'] })
  const pager = new UffdPager(child)
  const abortNow = () => void pager.quit()
  const offAbort = onAbort(o.signal, abortNow)
  try {
    const hello = await Promise.race([pager.expect('H'), pager.failed])
    pager.qemuFd = hello.readUInt32LE(0)
    pager.regrabbed = hello[20] === 1
    return pager
  } catch (err) {
    child.kill('SIGKILL')
    throw err instanceof MeshError ? err : new PostcopyError(describeError(err), { cause: err })
  } finally {
    offAbort()
  }
}
