/**
 * CPU throttling of a QEMU's vCPU threads with the kernel's CFS bandwidth control, in whichever
 * hierarchy has the cpu controller:
 *  - cgroup v2 (a pure v2 host, e.g. Debian 12 with systemd): the QEMU process moves into
 *    `<root>/mesh-throttle/<vm>-<pid>`, which becomes a threaded domain; its vCPU threads go into the
 *    threaded child `vcpu`, whose `cpu.max` is the limit. The I/O thread (the guest's network) is not
 *    limited.
 *  - cgroup v1 (a hybrid host, like the one this was measured on: the cpu controller at
 *    /sys/fs/cgroup/cpu): the vCPU threads alone move into `<root>/mesh-throttle/<vm>-<pid>` (v1 moves
 *    single threads through `tasks`), limited by `cpu.cfs_quota_us`.
 * The hierarchy is found in /proc/self/mountinfo; an agent whose mount namespace does not show one
 * (`ip netns exec` remounts /sys, hiding /sys/fs/cgroup) mounts it privately under the temp dir.
 *
 * Lifting puts every thread (v1) or the process (v2) back into the cgroup it came from and removes
 * ours. A limiter left behind by a killed agent is found and lifted by sweepThrottles().
 */
import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdir, readdir, readFile, rmdir, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { describeError } from '../../src/base/errors.ts'
import { type CpuLimiter, ThrottleError, type ThrottleProvider } from './interfaces.ts'

const execFileAsync = promisify(execFile)

export type CgroupKind = 'cgroup2' | 'cgroup1'

export interface CpuHierarchy {
  kind: CgroupKind
  /** Where the hierarchy is mounted (its root as this process sees it). */
  mount: string
}

/** Our cgroups live under this directory of the hierarchy. */
export const THROTTLE_DIR = 'mesh-throttle'
/** The CFS period: short, so a throttled vCPU is never held off for long at a time. */
export const PERIOD_US = 100_000
/** The longest period, used for the deepest throttles (the kernel's minimum quota is 1 ms). */
export const MAX_PERIOD_US = 200_000
export const MIN_QUOTA_US = 1000
/** The deepest throttle a limiter applies: 1 ms of CPU per 200 ms period. */
export const MAX_LEVEL = 1 - MIN_QUOTA_US / MAX_PERIOD_US

/** The quota and period for a throttle level (one vCPU's share of a CPU = 1 - level). */
export function quotaFor(level: number): { quotaUs: number; periodUs: number } | undefined {
  if (!(level > 0)) return undefined
  const share = Math.max(1 - Math.min(level, MAX_LEVEL), MIN_QUOTA_US / MAX_PERIOD_US)
  const quota = Math.round(share * PERIOD_US)
  if (quota >= MIN_QUOTA_US) return { quotaUs: quota, periodUs: PERIOD_US }
  return { quotaUs: MIN_QUOTA_US, periodUs: Math.min(MAX_PERIOD_US, Math.round(MIN_QUOTA_US / share)) }
}

/** The cpu-controller hierarchies in a mountinfo text. */
export function parseMountinfo(text: string): { kind: CgroupKind; mount: string; options: string[] }[] {
  const out: { kind: CgroupKind; mount: string; options: string[] }[] = []
  for (const line of text.split('\n')) {
    const sep = line.indexOf(' - ')
    if (sep < 0) continue
    const left = line.slice(0, sep).split(' ')
    const right = line.slice(sep + 3).split(' ')
    const fstype = right[0]
    const mount = left[4]
    if (mount === undefined) continue
    const unescaped = mount.replace(/\\(\d{3})/g, (_, o: string) =>
      String.fromCharCode(Number.parseInt(o, 8)),
    )
    const options = (right[2] ?? '').split(',')
    if (fstype === 'cgroup2') out.push({ kind: 'cgroup2', mount: unescaped, options })
    else if (fstype === 'cgroup' && options.includes('cpu'))
      out.push({ kind: 'cgroup1', mount: unescaped, options })
  }
  return out
}

async function readText(path: string): Promise<string | undefined> {
  return readFile(path, 'utf8').catch(() => undefined)
}

/** A v2 mount whose root offers the cpu controller, or a v1 mount of the cpu controller. */
async function pickHierarchy(mountinfo: string): Promise<CpuHierarchy | undefined> {
  const found = parseMountinfo(mountinfo)
  for (const m of found) {
    if (m.kind !== 'cgroup2') continue
    const controllers = await readText(join(m.mount, 'cgroup.controllers'))
    if (controllers?.split(/\s+/).includes('cpu') === true) return { kind: 'cgroup2', mount: m.mount }
  }
  const v1 = found.find((m) => m.kind === 'cgroup1')
  return v1 === undefined ? undefined : { kind: 'cgroup1', mount: v1.mount }
}

let located: Promise<CpuHierarchy | { reason: string }> | undefined

/**
 * The hierarchy to throttle in. Looked up once per process; mounts one under the temp dir when this
 * mount namespace shows none (root only).
 */
export function locateCpuHierarchy(): Promise<CpuHierarchy | { reason: string }> {
  located ??= (async () => {
    const info = (await readText('/proc/self/mountinfo')) ?? ''
    const here = await pickHierarchy(info)
    if (here !== undefined) return here
    if (process.getuid?.() !== 0)
      return { reason: 'no cgroup hierarchy with the cpu controller is mounted, and mounting one needs root' }
    const dir = join(tmpdir(), 'mesh-cgroup-cpu')
    await mkdir(dir, { recursive: true })
    // v2 first (a pure v2 host); on a hybrid host the cpu controller is bound to v1 and v2 lacks it.
    for (const args of [
      ['-t', 'cgroup2', 'none', dir],
      ['-t', 'cgroup', '-o', 'cpu', 'cgroup', dir],
    ]) {
      try {
        await execFileAsync('mount', args, { timeout: 10_000 })
      } catch {
        continue
      }
      const mounted = await pickHierarchy((await readText('/proc/self/mountinfo')) ?? '')
      if (mounted !== undefined) return mounted
      await execFileAsync('umount', [dir], { timeout: 10_000 }).catch(() => {})
    }
    return { reason: 'no cgroup hierarchy offers the cpu controller (cgroup v2 cpu, or v1 cpu)' }
  })()
  return located
}

/** The thread ids of a QEMU's vCPUs ('CPU 0/TCG', 'CPU 1/KVM'…), or every thread when none is named so. */
export async function vcpuThreads(pid: number): Promise<{ tids: number[]; vcpuOnly: boolean }> {
  const names = await readdir(`/proc/${pid}/task`).catch(() => [] as string[])
  const all: number[] = []
  const vcpus: number[] = []
  for (const n of names) {
    const tid = Number(n)
    if (!Number.isInteger(tid)) continue
    all.push(tid)
    const comm = await readText(`/proc/${pid}/task/${n}/comm`)
    if (comm?.startsWith('CPU ') === true) vcpus.push(tid)
  }
  return vcpus.length > 0 ? { tids: vcpus, vcpuOnly: true } : { tids: all, vcpuOnly: false }
}

/** The cgroup path (relative to the hierarchy's root) of a thread or process in that hierarchy. */
export function cgroupPathOf(procCgroup: string, kind: CgroupKind): string | undefined {
  for (const line of procCgroup.split('\n')) {
    const m = /^(\d+):([^:]*):(.*)$/.exec(line)
    if (m === null) continue
    const [, id, controllers, path] = m as unknown as [string, string, string, string]
    if (kind === 'cgroup2' && id === '0' && controllers === '') return path
    if (kind === 'cgroup1' && controllers.split(',').includes('cpu')) return path
  }
  return undefined
}

async function write(path: string, value: string): Promise<void> {
  try {
    await writeFile(path, value)
  } catch (err) {
    throw new ThrottleError(`cannot write '${value}' to ${path}: ${describeError(err)}`, { cause: err })
  }
}

async function ensureDir(path: string): Promise<void> {
  try {
    await mkdir(path, { recursive: true })
  } catch (err) {
    throw new ThrottleError(`cannot create cgroup ${path}: ${describeError(err)}`, { cause: err })
  }
}

/** Enables the cpu controller for a v2 cgroup's children (a no-op when it already is). */
async function enableCpu(dir: string): Promise<void> {
  const cur = await readText(join(dir, 'cgroup.subtree_control'))
  if (cur?.split(/\s+/).includes('cpu') === true) return
  await write(join(dir, 'cgroup.subtree_control'), '+cpu')
}

class CgroupLimiter implements CpuLimiter {
  level = 0
  private attached = false
  private lifted = false
  /** Where each moved thread (v1) or the process (v2) came from, relative to the hierarchy root. */
  private readonly origin = new Map<number, string>()

  constructor(
    private readonly h: CpuHierarchy,
    private readonly pid: number,
    private readonly dir: string,
    private readonly tids: number[],
    readonly vcpuOnly: boolean,
  ) {}

  get backend(): string {
    return this.h.kind
  }

  /** The file whose value is the limit. */
  private get limitDir(): string {
    return this.h.kind === 'cgroup2' ? join(this.dir, 'vcpu') : this.dir
  }

  private async attach(): Promise<void> {
    if (this.attached) return
    const { kind, mount } = this.h
    await ensureDir(this.dir)
    if (kind === 'cgroup1') {
      for (const tid of this.tids) {
        const from = cgroupPathOf((await readText(`/proc/${this.pid}/task/${tid}/cgroup`)) ?? '', kind)
        this.origin.set(tid, from ?? '/')
        await write(join(this.dir, 'tasks'), String(tid))
      }
    } else {
      await enableCpu(mount)
      await enableCpu(join(mount, THROTTLE_DIR))
      const from = cgroupPathOf((await readText(`/proc/${this.pid}/cgroup`)) ?? '', kind)
      this.origin.set(this.pid, from ?? '/')
      await write(join(this.dir, 'cgroup.procs'), String(this.pid))
      if (this.vcpuOnly) {
        await ensureDir(join(this.dir, 'vcpu'))
        await write(join(this.dir, 'vcpu', 'cgroup.type'), 'threaded')
        await enableCpu(this.dir)
        for (const tid of this.tids) await write(join(this.dir, 'vcpu', 'cgroup.threads'), String(tid))
      }
      // Without named vCPU threads the whole process is limited: the limit goes on its own cgroup.
    }
    this.attached = true
  }

  async set(level: number): Promise<void> {
    if (this.lifted) throw new ThrottleError('this limiter was lifted')
    const q = quotaFor(level)
    if (q === undefined) {
      if (this.attached) await this.writeLimit(undefined)
      this.level = 0
      return
    }
    await this.attach()
    await this.writeLimit(q)
    this.level = Math.min(level, MAX_LEVEL)
  }

  private async writeLimit(q: { quotaUs: number; periodUs: number } | undefined): Promise<void> {
    const dir = this.h.kind === 'cgroup2' && !this.vcpuOnly ? this.dir : this.limitDir
    if (this.h.kind === 'cgroup2') {
      await write(join(dir, 'cpu.max'), q === undefined ? `max ${PERIOD_US}` : `${q.quotaUs} ${q.periodUs}`)
      return
    }
    // v1: the quota must fit the period at every step: lift the quota first, then set the period.
    await write(join(dir, 'cpu.cfs_quota_us'), '-1')
    if (q === undefined) return
    await write(join(dir, 'cpu.cfs_period_us'), String(q.periodUs))
    await write(join(dir, 'cpu.cfs_quota_us'), String(q.quotaUs))
  }

  async lift(): Promise<void> {
    if (this.lifted) return
    this.lifted = true
    this.level = 0
    if (!this.attached) return
    await releaseCgroup(this.h, this.dir, this.pid, this.origin)
  }
}

/**
 * Lifts and removes one of our cgroups: no limit, threads (v1) or the process (v2) back where they
 * came from (`origin`; the hierarchy's root for anything not in it), then rmdir. Best effort: a thread
 * or process that is gone is skipped.
 */
async function releaseCgroup(
  h: CpuHierarchy,
  dir: string,
  pid: number | undefined,
  origin: Map<number, string>,
): Promise<void> {
  const back = (id: number) => join(h.mount, origin.get(id) ?? '/')
  if (h.kind === 'cgroup1') {
    await writeFile(join(dir, 'cpu.cfs_quota_us'), '-1').catch(() => {})
    const tasks = ((await readText(join(dir, 'tasks'))) ?? '').split('\n').filter((l) => l !== '')
    for (const t of tasks) {
      const tid = Number(t)
      await writeFile(join(back(tid), 'tasks'), t).catch(() =>
        writeFile(join(h.mount, 'tasks'), t).catch(() => {}),
      )
    }
    await rmdir(dir).catch(() => {})
    return
  }
  await writeFile(join(dir, 'vcpu', 'cpu.max'), `max ${PERIOD_US}`).catch(() => {})
  await writeFile(join(dir, 'cpu.max'), `max ${PERIOD_US}`).catch(() => {})
  const threads = ((await readText(join(dir, 'vcpu', 'cgroup.threads'))) ?? '')
    .split('\n')
    .filter((l) => l !== '')
  for (const t of threads) await writeFile(join(dir, 'cgroup.threads'), t).catch(() => {})
  await rmdir(join(dir, 'vcpu')).catch(() => {})
  const procs = ((await readText(join(dir, 'cgroup.procs'))) ?? '').split('\n').filter((l) => l !== '')
  for (const p of procs) {
    const id = Number(p)
    await writeFile(join(id === pid ? back(id) : h.mount, 'cgroup.procs'), p).catch(() =>
      writeFile(join(h.mount, 'cgroup.procs'), p).catch(() => {}),
    )
  }
  await rmdir(dir).catch(() => {})
}

/**
 * Lifts the limiters a killed agent left behind on its VMs (cgroups under mesh-throttle/ named
 * `<vm>-<pid>` for one of `pids`, or for a process that is gone): a guest must never stay throttled
 * after the move that throttled it is gone. Other agents' limiters on the same machine are left alone.
 * Returns how many were lifted.
 */
export async function sweepThrottles(pids: ReadonlySet<number>, hierarchy?: CpuHierarchy): Promise<number> {
  const h = hierarchy ?? (await locateCpuHierarchy())
  if ('reason' in h) return 0
  const base = join(h.mount, THROTTLE_DIR)
  const names = await readdir(base, { withFileTypes: true }).catch(() => [])
  let n = 0
  for (const d of names) {
    if (!d.isDirectory()) continue
    const pid = Number(/-(\d+)$/.exec(d.name)?.[1])
    if (!pids.has(pid) && existsSync(`/proc/${pid}`)) continue
    // The origin is unknown after a crash: back to the hierarchy's root (what a fresh process gets).
    await releaseCgroup(h, join(base, d.name), undefined, new Map())
    n++
  }
  return n
}

/** Throttling through cgroups; `hierarchy` fixes the hierarchy (tests), else it is located. */
export function createCgroupThrottle(options: { hierarchy?: CpuHierarchy } = {}): ThrottleProvider {
  const where = async (): Promise<CpuHierarchy> => {
    const h = options.hierarchy ?? (await locateCpuHierarchy())
    if ('reason' in h) throw new ThrottleError(`cannot throttle vCPUs here: ${h.reason}`)
    return h
  }
  return {
    async available() {
      try {
        const h = await where()
        return { ok: true, backend: h.kind }
      } catch (err) {
        return { ok: false, reason: describeError(err) }
      }
    },
    async forProcess(pid, name) {
      const h = await where()
      const { tids, vcpuOnly } = await vcpuThreads(pid)
      if (tids.length === 0) throw new ThrottleError(`process ${pid} has no threads (gone?)`)
      const safe = name.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 64)
      return new CgroupLimiter(h, pid, join(h.mount, THROTTLE_DIR, `${safe}-${pid}`), tids, vcpuOnly)
    },
  }
}
