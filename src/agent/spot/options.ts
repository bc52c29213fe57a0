/**
 * The agent's spot options (`mesh agent --spot … --label … --capacity …`), parsed and checked here so
 * that the CLI and tests share one reading of them.
 */
import { statfsSync } from 'node:fs'
import { availableParallelism, totalmem } from 'node:os'
import { UsageError } from '../../base/errors.ts'
import type { SpotSource } from './notice.ts'
import type { Room } from './placement.ts'

export interface SpotOptions {
  source?: SpotSource
  pollMs?: number
  windowMs?: number
  marginMs?: number
  onRebalance?: 'evacuate' | 'report'
  labels: Record<string, string>
  /** Room offered to VMs; missing parts default to this machine (see defaultOffered). */
  offered?: Partial<Room>
}

const LABEL_RE = /^([a-z][a-z0-9._-]{0,62})=([^\s=,]{0,128})$/

/** `provider=gcp` → ['provider', 'gcp']; a `price` must be a non-negative number. */
export function parseLabel(v: string): [string, string] {
  const m = LABEL_RE.exec(v.trim())
  if (m === null) throw new UsageError(`--label '${v}' must look like key=value (lowercase key, no spaces)`)
  if (m[1] === 'price' && !(Number.parseFloat(m[2]!) >= 0 && /^\d+(\.\d+)?$/.test(m[2]!)))
    throw new UsageError(`--label price=${m[2]} must be a non-negative number (e.g. price=0.012)`)
  return [m[1]!, m[2]!]
}

const SIZE_RE = /^(\d+(?:\.\d+)?)([KMGT]i?B?|[kmgt])?$/

/** 512M, 8G, 1.5GiB, 100T → bytes (binary units). */
export function parseSize(v: string, what: string): number {
  const m = SIZE_RE.exec(v.trim())
  if (m === null) throw new UsageError(`${what} '${v}' must be a size like 512M or 8G`)
  const unit = (m[2] ?? '').charAt(0).toUpperCase()
  const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[unit] ?? 1
  return Math.round(Number(m[1]) * mult)
}

/** `ram=8G,cpus=4,disk=100G` (any subset) → the room offered to VMs. */
export function parseCapacity(v: string): Partial<Room> {
  const out: Partial<Room> = {}
  for (const part of v.split(',')) {
    const [k, val] = part.split('=')
    if (val === undefined || val === '') throw new UsageError(`--capacity '${v}': expected key=value pairs`)
    if (k === 'ram') out.ramMiB = Math.floor(parseSize(val, '--capacity ram') / 2 ** 20)
    else if (k === 'disk') out.diskBytes = parseSize(val, '--capacity disk')
    else if (k === 'cpus' || k === 'vcpus') {
      const n = Number(val)
      if (!Number.isInteger(n) || n < 0 || n > 4096)
        throw new UsageError(`--capacity cpus=${val} must be a whole number`)
      out.vcpus = n
    } else throw new UsageError(`--capacity: unknown key '${k}' (ram, cpus, disk)`)
  }
  return out
}

/**
 * What a host offers when --capacity does not say: its RAM less 1 GiB for itself, 4 vCPUs per core
 * (guests are mostly idle; QEMU overcommits CPUs, not RAM), and for VMs' writable disks the free space
 * of the state dir's file system at start less a tenth (chunks and standbys live there too).
 */
export function defaultOffered(partial: Partial<Room> = {}, stateDir?: string): Room {
  let disk = 2 ** 40
  if (partial.diskBytes === undefined && stateDir !== undefined) {
    try {
      const st = statfsSync(stateDir)
      disk = Math.floor(st.bavail * st.bsize * 0.9)
    } catch {
      // No state dir yet (first start): keep the generous default.
    }
  }
  return {
    ramMiB: partial.ramMiB ?? Math.max(0, Math.floor(totalmem() / 2 ** 20) - 1024),
    vcpus: partial.vcpus ?? availableParallelism() * 4,
    diskBytes: partial.diskBytes ?? disk,
  }
}
