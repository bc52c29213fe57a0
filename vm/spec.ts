import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { dirname, isAbsolute, resolve } from 'node:path'
import { VmSpecError } from './errors.ts'

/**
 * What a VM is, independent of the host it runs on. The same spec (after normalisation) is used on the
 * source and the destination of a migration, so everything the guest can observe (MAC, memory size,
 * CPU count, kernel command line) lives here and nothing host-specific does.
 */
export interface VmSpec {
  /** Unique on a host; used in file names: letters, digits, `-`, `_`, `.`, at most 63 characters. */
  name: string
  /** Guest RAM in MiB (the RAM file has exactly this size). */
  memoryMiB: number
  vcpus: number
  /** A path, or an image name `image:NAME[:TAG]` that the chunk layer resolves to a path before start. */
  kernel: string
  initrd?: string
  /** Optional raw/qcow2 disk (path or image name), attached as virtio-blk as it is (not moved). */
  disk?: string
  /**
   * The VM's own writable disk: a qcow2 overlay (created by the runtime) on a read-only base image.
   * It is /dev/vda in the guest and moves with the VM. Spec files write it as `disk: {base, sizeGiB}`.
   */
  volume?: VolumeSpec
  /** Guest MAC, lower case `xx:xx:xx:xx:xx:xx`, unicast. Derived from the name when the file omits it. */
  mac: string
  /** Guest address in CIDR form; passed to the guest as `mesh.ip=` on the kernel command line. */
  ip?: string
  /** Extra kernel command line (the runtime adds `console=ttyS0` and `mesh.ip=`). */
  cmdline?: string
}

/** A writable disk layered on a read-only base. */
export interface VolumeSpec {
  /** `image:NAME[:TAG]` (the chunk layer resolves it) or an absolute path to a raw image. */
  base: string
  /** The disk's size in GiB (at least the base's size); default: the base's size. */
  sizeGiB?: number
}

/** Largest writable disk a spec may ask for (GiB). */
export const MAX_VOLUME_GIB = 16 * 1024

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/
const IMAGE_RE = /^image:([A-Za-z0-9][A-Za-z0-9_.\-/]*)(?::([A-Za-z0-9_.-]+))?$/
const KNOWN = new Set([
  'name',
  'memoryMiB',
  'vcpus',
  'kernel',
  'initrd',
  'disk',
  'volume',
  'mac',
  'ip',
  'cmdline',
])

/** An image reference that the chunk layer resolves (`image:NAME[:TAG]`), or undefined for a path. */
export function parseImageRef(value: string): { name: string; tag: string } | undefined {
  const m = IMAGE_RE.exec(value)
  if (m === null) return undefined
  return { name: m[1]!, tag: m[2] ?? 'latest' }
}

/** A stable locally administered MAC for a VM name (52:54:00 is QEMU's prefix; keeps MACs readable). */
export function macForName(name: string): string {
  const h = createHash('sha256').update(name).digest()
  return ['52', '54', '00', h[0]!, h[1]!, h[2]!]
    .map((b) => (typeof b === 'string' ? b : b.toString(16).padStart(2, '0')))
    .join(':')
}

function str(o: Record<string, unknown>, key: string, required: boolean): string | undefined {
  const v = o[key]
  if (v === undefined || v === null) {
    if (required) throw new VmSpecError(`spec.${key}`, 'is required')
    return undefined
  }
  if (typeof v !== 'string') throw new VmSpecError(`spec.${key}`, `must be a string, got ${typeof v}`)
  if (required && v.trim() === '') throw new VmSpecError(`spec.${key}`, 'must not be empty')
  return v
}

function int(o: Record<string, unknown>, key: string, min: number, max: number, def?: number): number {
  const v = o[key] ?? def
  if (v === undefined) throw new VmSpecError(`spec.${key}`, 'is required')
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new VmSpecError(`spec.${key}`, `must be an integer from ${min} to ${max}, got ${JSON.stringify(v)}`)
  }
  return v
}

function pathOrImage(key: string, v: string | undefined, baseDir: string | undefined): string | undefined {
  if (v === undefined) return undefined
  if (v.startsWith('image:')) {
    if (parseImageRef(v) === undefined)
      throw new VmSpecError(`spec.${key}`, `bad image name '${v}' (image:NAME[:TAG])`)
    return v
  }
  if (v.includes('\0') || v.includes(',')) {
    // QEMU's option parser splits on commas; a comma in a path would smuggle options in.
    throw new VmSpecError(`spec.${key}`, 'path must not contain commas or NUL bytes')
  }
  return baseDir !== undefined && !isAbsolute(v) ? resolve(baseDir, v) : v
}

/**
 * `disk: {base, sizeGiB}` (or `volume:` as stored): base `image:NAME[:TAG]`, `NAME:TAG` (an image
 * too), or a path (absolute, or starting with ./ or ../, relative to the spec file).
 */
function volumeSpec(key: string, v: unknown, baseDir: string | undefined): VolumeSpec {
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw new VmSpecError(`spec.${key}`, 'must be an object like {"base": "image:debian-pg:1", "sizeGiB": 8}')
  const o = v as Record<string, unknown>
  for (const k of Object.keys(o))
    if (k !== 'base' && k !== 'sizeGiB')
      throw new VmSpecError(`spec.${key}.${k}`, 'unknown field (known: base, sizeGiB)')
  const base = o.base
  if (typeof base !== 'string' || base.trim() === '')
    throw new VmSpecError(`spec.${key}.base`, 'is required: an image name (NAME:TAG) or a path')
  let out: string
  if (base.startsWith('/') || base.startsWith('./') || base.startsWith('../')) {
    out = pathOrImage(`${key}.base`, base, baseDir)!
  } else {
    const ref = base.startsWith('image:') ? base : `image:${base}`
    const parsed = parseImageRef(ref)
    if (parsed === undefined)
      throw new VmSpecError(
        `spec.${key}.base`,
        `bad image name '${base}' (NAME[:TAG], or a path starting with /)`,
      )
    out = `image:${parsed.name}:${parsed.tag}`
  }
  const spec: VolumeSpec = { base: out }
  if (o.sizeGiB !== undefined && o.sizeGiB !== null) {
    const g = o.sizeGiB
    if (typeof g !== 'number' || !Number.isInteger(g) || g < 1 || g > MAX_VOLUME_GIB)
      throw new VmSpecError(
        `spec.${key}.sizeGiB`,
        `must be an integer from 1 to ${MAX_VOLUME_GIB}, got ${JSON.stringify(g)}`,
      )
    spec.sizeGiB = g
  }
  return spec
}

function checkCidr(ip: string): void {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(ip)
  if (m === null || m.slice(1, 5).some((p) => Number(p) > 255) || Number(m[5]) > 32) {
    throw new VmSpecError('spec.ip', `must be an IPv4 address in CIDR form like 10.0.0.2/24, got '${ip}'`)
  }
}

/**
 * Validates a parsed spec object and returns a normalised VmSpec. Errors name the field
 * (`VmSpecError: spec.memoryMiB: must be ...`). Relative paths resolve against `baseDir` when given.
 */
export function validateVmSpec(input: unknown, baseDir?: string): VmSpec {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw new VmSpecError('spec', 'must be a JSON object')
  }
  const o = input as Record<string, unknown>
  for (const k of Object.keys(o)) {
    if (!KNOWN.has(k)) throw new VmSpecError(`spec.${k}`, `unknown field (known: ${[...KNOWN].join(', ')})`)
  }
  const name = str(o, 'name', true)!
  if (!NAME_RE.test(name)) {
    throw new VmSpecError('spec.name', `must be 1-63 letters, digits, '-', '_' or '.', got '${name}'`)
  }
  const memoryMiB = int(o, 'memoryMiB', 16, 1024 * 1024)
  const vcpus = int(o, 'vcpus', 1, 64, 1)
  const kernel = pathOrImage('kernel', str(o, 'kernel', true), baseDir)!
  const initrd = pathOrImage('initrd', str(o, 'initrd', false), baseDir)
  // `disk` as an object is the VM's writable disk (stored as `volume`); as a string, a file attached
  // as it is.
  let volume: VolumeSpec | undefined
  let disk: string | undefined
  if (typeof o.disk === 'object' && o.disk !== null) {
    if (o.volume !== undefined)
      throw new VmSpecError('spec.disk', 'give either disk: {...} or volume, not both')
    volume = volumeSpec('disk', o.disk, baseDir)
  } else {
    disk = pathOrImage('disk', str(o, 'disk', false), baseDir)
    if (o.volume !== undefined) volume = volumeSpec('volume', o.volume, baseDir)
  }
  if (disk !== undefined && volume !== undefined)
    throw new VmSpecError('spec.disk', 'a VM has either an attached disk file or a writable disk, not both')
  let mac = str(o, 'mac', false)?.toLowerCase()
  if (mac === undefined) mac = macForName(name)
  else if (!MAC_RE.test(mac))
    throw new VmSpecError('spec.mac', `must look like 52:54:00:12:34:56, got '${mac}'`)
  else if ((Number.parseInt(mac.slice(0, 2), 16) & 1) === 1)
    throw new VmSpecError('spec.mac', 'must be unicast')
  const ip = str(o, 'ip', false)
  if (ip !== undefined) checkCidr(ip)
  const cmdline = str(o, 'cmdline', false)
  if (cmdline !== undefined && /[\n\0]/.test(cmdline))
    throw new VmSpecError('spec.cmdline', 'must be one line')
  const spec: VmSpec = { name, memoryMiB, vcpus, kernel, mac }
  if (initrd !== undefined) spec.initrd = initrd
  if (disk !== undefined) spec.disk = disk
  if (volume !== undefined) spec.volume = volume
  if (ip !== undefined) spec.ip = ip
  if (cmdline !== undefined) spec.cmdline = cmdline
  return spec
}

/** Parses spec text (JSON). The `source` names the file in errors. */
export function parseVmSpec(text: string, baseDir?: string, source = 'spec'): VmSpec {
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (err) {
    throw new VmSpecError(source, `is not valid JSON: ${(err as Error).message}`, { cause: err })
  }
  return validateVmSpec(parsed, baseDir)
}

/** Reads and validates a spec file; relative kernel/initrd/disk paths are relative to the file. */
export async function loadVmSpecFile(path: string): Promise<VmSpec> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    throw new VmSpecError(path, `cannot read the spec file: ${(err as Error).message}`, { cause: err })
  }
  return parseVmSpec(text, dirname(resolve(path)), path)
}
