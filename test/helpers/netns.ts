/**
 * Low-level helpers for network namespaces and the processes inside them, used by the clouds fixture
 * (`clouds.ts`). Everything here shells out to iproute2; nothing keeps state.
 *
 * Each async helper has a synchronous twin where the clouds fixture needs one: `process.on('exit')`
 * handlers cannot await, so the last-chance cleanup must run with spawnSync.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { constants } from 'node:os'
import { MeshError } from '../../src/errors.ts'

/** A namespace command or cleanup step failed; `stderr` of the failing command is in the message. */
export class NetnsError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_NETNS' })
  }
}

export interface ExecOptions {
  /** Kill the command's whole process group (SIGKILL) after this long; the result has `timedOut`. */
  timeoutMs?: number
  /** Written to the command's stdin, which is then closed. */
  input?: string
  env?: NodeJS.ProcessEnv
  /** Aborting kills the command's process group, like a timeout. */
  signal?: AbortSignal
}

export interface ExecResult {
  /** Exit status; 128 + signal number when the command was killed by a signal. */
  code: number
  stdout: string
  stderr: string
  signal: NodeJS.Signals | null
  timedOut: boolean
}

/**
 * Runs a command to completion in its own process group and never rejects for a non-zero exit (the
 * caller decides what a failure means). `onSpawn` lets a caller track the child while it runs, so a
 * teardown can kill it even when nobody awaits the promise any more.
 */
export function execCommand(
  cmd: string,
  args: readonly string[],
  opts: ExecOptions = {},
  onSpawn?: (child: ChildProcess) => void,
): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    // detached: the command leads its own process group, so a timeout kills its children too.
    const child = spawn(cmd, args, { detached: true, env: opts.env, stdio: ['pipe', 'pipe', 'pipe'] })
    onSpawn?.(child)
    const out: Buffer[] = []
    const err: Buffer[] = []
    let timedOut = false
    const killGroup = (): void => {
      if (child.pid !== undefined) killProcessGroup(child.pid, 'SIGKILL')
    }
    const timer =
      opts.timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true
            killGroup()
          }, opts.timeoutMs)
    const onAbort = (): void => killGroup()
    opts.signal?.addEventListener('abort', onAbort, { once: true })
    if (opts.signal?.aborted === true) killGroup()
    child.stdout.on('data', (b: Buffer) => out.push(b))
    child.stderr.on('data', (b: Buffer) => err.push(b))
    // EPIPE when the command exits without reading its stdin is not our failure.
    child.stdin.on('error', () => {})
    child.stdin.end(opts.input ?? '')
    const finish = (): void => {
      if (timer !== undefined) clearTimeout(timer)
      opts.signal?.removeEventListener('abort', onAbort)
    }
    child.on('error', (e) => {
      finish()
      reject(new NetnsError(`cannot run ${cmd}: ${e.message}`, { cause: e }))
    })
    child.on('close', (status, sig) => {
      finish()
      resolve({
        code: status ?? 128 + (sig === null ? 0 : (constants.signals[sig] ?? 0)),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        signal: sig,
        timedOut,
      })
    })
  })
}

/** Like execCommand, but a non-zero exit throws NetnsError carrying the command's stderr. */
export async function runChecked(
  cmd: string,
  args: readonly string[],
  opts: ExecOptions = {},
): Promise<ExecResult> {
  const r = await execCommand(cmd, args, opts)
  if (r.code !== 0) {
    const detail = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-3).join(' | ')
    const why = r.timedOut ? `timed out after ${opts.timeoutMs} ms` : `exit ${r.code}`
    throw new NetnsError(`${cmd} ${args.join(' ')}: ${why}: ${detail}`)
  }
  return r
}

/** Runs several `ip` commands in one process (`ip [-n NS] -batch -`); stops at the first failure. */
export async function ipBatch(ns: string | undefined, lines: readonly string[], signal?: AbortSignal) {
  if (lines.length === 0) return
  const args = ns === undefined ? ['-batch', '-'] : ['-n', ns, '-batch', '-']
  await runChecked('ip', args, { input: `${lines.join('\n')}\n`, signal, timeoutMs: 30_000 })
}

/** Names of every namespace under /run/netns (what `ip netns list` shows). */
export function listNetns(): string[] {
  try {
    return readdirSync('/run/netns')
  } catch {
    return []
  }
}

/** Pids of every process whose network namespace is NS (empty when the namespace is gone). */
export function netnsPidsSync(ns: string): number[] {
  const r = spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8', timeout: 10_000 })
  if (r.status !== 0) return []
  return parsePids(r.stdout)
}

export async function netnsPids(ns: string): Promise<number[]> {
  const r = await execCommand('ip', ['netns', 'pids', ns], { timeoutMs: 10_000 })
  if (r.code !== 0) return []
  return parsePids(r.stdout)
}

function parsePids(text: string): number[] {
  return text
    .split(/\s+/)
    .filter((s) => /^\d+$/.test(s))
    .map(Number)
}

/** Deletes a namespace; a namespace that is already gone is not an error. */
export async function deleteNetns(ns: string): Promise<void> {
  const r = await execCommand('ip', ['netns', 'del', ns], { timeoutMs: 10_000 })
  if (r.code !== 0 && listNetns().includes(ns)) {
    throw new NetnsError(`ip netns del ${ns}: ${r.stderr.trim()}`)
  }
}

export function deleteNetnsSync(ns: string): void {
  spawnSync('ip', ['netns', 'del', ns], { stdio: 'ignore', timeout: 10_000 })
}

/** Sends a signal to a whole process group; a group that no longer exists is ignored. */
export function killProcessGroup(pgid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pgid, sig)
  } catch {
    // ESRCH: the group is gone already. EPERM cannot happen as root.
  }
}

export function killPid(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig)
  } catch {
    // already gone
  }
}

/**
 * True while a process with this pid exists. A zombie (exited, not reaped) still counts: callers that
 * need "really gone" must wait for the parent to reap it (Node does for its own children on 'exit').
 */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/** Kills every process inside NS: SIGTERM, up to graceMs to exit, then SIGKILL. */
export async function killNetnsProcesses(ns: string, graceMs: number): Promise<void> {
  let pids = await netnsPids(ns)
  if (pids.length === 0) return
  for (const pid of pids) killPid(pid, 'SIGTERM')
  const deadline = Date.now() + graceMs
  while (Date.now() < deadline) {
    await sleep(50)
    pids = await netnsPids(ns)
    if (pids.length === 0) return
  }
  for (const pid of pids) killPid(pid, 'SIGKILL')
}

/** Synchronous last-chance variant for exit handlers: SIGKILL straight away. */
export function killNetnsProcessesSync(ns: string): void {
  for (const pid of netnsPidsSync(ns)) killPid(pid, 'SIGKILL')
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}
