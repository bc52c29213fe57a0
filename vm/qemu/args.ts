import { accessSync, constants, existsSync } from 'node:fs'
import type { VmSpec } from '../spec.ts'

/** Everything host-specific QEMU needs besides the spec. */
export interface QemuPaths {
  ramPath: string
  qmpPath: string
  consolePath: string
  /** The stream socket QEMU listens on for the guest NIC (the tunnel connects here). */
  netPath: string
  /** The VM's writable disk (qcow2 overlay on its base) when the spec has a volume. */
  volumePath?: string
  /** Local files for `image:` references of the spec's kernel/initrd (resolved by the chunk layer). */
  kernelPath?: string
  initrdPath?: string
}

/** QEMU's node name of a VM's writable disk: dirty bitmaps and NBD exports name it (vm/disk). */
export const VOLUME_NODE = 'vol0'

/**
 * The guest NIC's backend. `stream` (default): QEMU listens on `netPath` and exchanges length-prefixed
 * Ethernet frames with whoever connects (the tunnel); QEMU is the *server* because as a client QEMU 7.2
 * never reconnects. `user`: QEMU's user-mode network with host port forwards, for tests that need to
 * reach guest services without a tunnel (the guest should use 10.0.2.15/24 then).
 */
export type NetBackend =
  | { type: 'stream' }
  | { type: 'user'; hostfwd: Array<{ hostPort: number; guestPort: number; hostAddr?: string }> }

export interface QemuArgsOptions {
  accel?: 'kvm' | 'tcg'
  incoming?: boolean
  net?: NetBackend
}

/**
 * True when KVM can run our guests: /dev/kvm opens read-write *and* it is backed by hardware
 * virtualisation (kvm_intel / kvm_amd). A PVM host offers /dev/kvm too (module kvm_pvm), but only
 * PVM-enabled guest kernels run there (a Debian cloud kernel hangs early: measured), so it gets TCG.
 * `MESH_ACCEL=kvm|tcg` overrides the choice.
 */
export function kvmUsable(env: NodeJS.ProcessEnv = process.env): boolean {
  if (env.MESH_ACCEL === 'kvm') return true
  if (env.MESH_ACCEL === 'tcg') return false
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK)
  } catch {
    return false
  }
  return existsSync('/sys/module/kvm_intel') || existsSync('/sys/module/kvm_amd')
}

/** QEMU splits option values on commas; `,,` is a literal comma. */
function esc(v: string): string {
  return v.replaceAll(',', ',,')
}

/** The kernel command line the runtime gives every guest: serial console, mesh.ip, then the spec's. */
export function kernelCmdline(spec: VmSpec): string {
  // no_timer_check: the kernel's IO-APIC timer check counts ticks over a short busy wait; a TCG vCPU on
  // a loaded host sees none and the guest panics at boot ("IO-APIC + timer doesn't work!"). The check is
  // for broken physical timers; virtual machines commonly skip it (libguestfs's appliance does).
  const parts = ['console=ttyS0', 'no_timer_check']
  if (spec.ip !== undefined) parts.push(`mesh.ip=${spec.ip}`)
  if (spec.cmdline !== undefined && spec.cmdline.trim() !== '') parts.push(spec.cmdline.trim())
  return parts.join(' ')
}

/**
 * QEMU arguments for a spec. CPUs always start stopped (`-S`) so that the driver can set migration
 * capabilities before the guest runs; the driver sends `cont`. No display, no default devices, no VGA
 * (a smaller device state); the NIC has no option ROM (`romfile=`), for the same reason and because it
 * must match on both sides of a migration.
 */
export function buildQemuArgs(spec: VmSpec, paths: QemuPaths, options: QemuArgsOptions = {}): string[] {
  const accel = options.accel ?? (kvmUsable() ? 'kvm' : 'tcg')
  const size = `${spec.memoryMiB}M`
  const args = [
    '-name',
    `${esc(spec.name)},debug-threads=on`,
    '-accel',
    accel,
    '-machine',
    'pc,memory-backend=mem',
    '-m',
    size,
    '-smp',
    String(spec.vcpus),
    '-object',
    `memory-backend-file,id=mem,size=${size},mem-path=${esc(paths.ramPath)},share=on`,
    '-nodefaults',
    '-no-user-config',
    '-vga',
    'none',
    '-display',
    'none',
    // A guest reboot or panic ends the process, so it is reported as an exit instead of looping.
    '-no-reboot',
    '-chardev',
    `file,id=ser0,path=${esc(paths.consolePath)}`,
    '-serial',
    'chardev:ser0',
    '-qmp',
    `unix:${esc(paths.qmpPath)},server=on,wait=off`,
    '-kernel',
    paths.kernelPath ?? spec.kernel,
  ]
  const initrd = paths.initrdPath ?? spec.initrd
  if (initrd !== undefined) args.push('-initrd', initrd)
  args.push('-append', kernelCmdline(spec))
  const net = options.net ?? { type: 'stream' }
  if (net.type === 'stream') {
    args.push('-netdev', `stream,id=n0,server=on,addr.type=unix,addr.path=${esc(paths.netPath)}`)
  } else {
    const fwd = net.hostfwd.map(
      (f) => `,hostfwd=tcp:${f.hostAddr ?? '127.0.0.1'}:${f.hostPort}-:${f.guestPort}`,
    )
    args.push('-netdev', `user,id=n0${fwd.join('')}`)
  }
  args.push('-device', `virtio-net-pci,netdev=n0,mac=${spec.mac},romfile=`)
  if (spec.disk !== undefined) {
    const format = spec.disk.endsWith('.qcow2') ? 'qcow2' : 'raw'
    args.push('-drive', `file=${esc(spec.disk)},if=virtio,format=${format}`)
  }
  if (spec.volume !== undefined) {
    if (paths.volumePath === undefined)
      throw new TypeError(`VM '${spec.name}' has a volume but no volume path`)
    // A named node (not just a drive id): dirty bitmaps and NBD exports address it during migration.
    // The base is the overlay's backing file, opened read-only by QEMU.
    args.push(
      '-drive',
      `file=${esc(paths.volumePath)},if=none,id=${VOLUME_NODE}-drive,node-name=${VOLUME_NODE},format=qcow2,cache=writeback,discard=unmap`,
    )
    args.push('-device', `virtio-blk-pci,drive=${VOLUME_NODE}-drive,id=${VOLUME_NODE}-dev`)
  }
  args.push('-S')
  if (options.incoming === true) args.push('-incoming', 'defer')
  return args
}
