/**
 * `mesh doctor`: checks a host for what mesh needs and says how to fix what is missing. Each check is a
 * small function of the host (files under /proc, /sys, /dev and commands), injected so tests can run
 * them against a fake host; the agent's view (listen ports, relayed members, clock skew) is added when
 * an agent runs for the state dir.
 */
import { spawnSync } from 'node:child_process'
import { accessSync, constants, existsSync, readFileSync, statfsSync, statSync } from 'node:fs'
import type { PeerRow } from '../control/api.ts'

export type Verdict = 'ok' | 'warn' | 'fail'

export interface Check {
  name: string
  verdict: Verdict
  detail: string
  /** What to do about it (warn and fail only). */
  fix?: string
}

/** What the checks read of the host. */
export interface HostProbe {
  nodeVersion: string
  read(path: string): string | undefined
  exists(path: string): boolean
  /** Read and write access. */
  rw(path: string): boolean
  run(cmd: string, args: string[]): { status: number | null; stdout: string } | undefined
  freeBytes(path: string): number | undefined
  mode(path: string): number | undefined
}

export const realHost: HostProbe = {
  nodeVersion: process.versions.node,
  read: (p) => {
    try {
      return readFileSync(p, 'utf8')
    } catch {
      return undefined
    }
  },
  exists: (p) => existsSync(p),
  rw: (p) => {
    try {
      accessSync(p, constants.R_OK | constants.W_OK)
      return true
    } catch {
      return false
    }
  },
  run: (cmd, args) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 5000 })
    return r.error !== undefined ? undefined : { status: r.status, stdout: `${r.stdout}${r.stderr}` }
  },
  freeBytes: (p) => {
    try {
      const s = statfsSync(p)
      return s.bavail * s.bsize
    } catch {
      return undefined
    }
  },
  mode: (p) => {
    try {
      return statSync(p).mode & 0o777
    } catch {
      return undefined
    }
  },
}

export const UDP_BUFFER_WANT = 4 * 1024 * 1024
const QEMU_MIN: [number, number] = [7, 2]

export function hostChecks(h: HostProbe, stateDir: string): Check[] {
  const out: Check[] = []
  const add = (name: string, verdict: Verdict, detail: string, fix?: string) =>
    out.push({ name, verdict, detail, ...(verdict === 'ok' || fix === undefined ? {} : { fix }) })

  const major = Number(h.nodeVersion.split('.')[0])
  add('node', major >= 20 ? 'ok' : 'fail', `Node.js ${h.nodeVersion}`, 'install Node.js 20 or newer')

  const q = h.run('qemu-system-x86_64', ['--version'])
  const m = /version (\d+)\.(\d+)(\.\d+)?/.exec(q?.stdout ?? '')
  if (q === undefined || m === null)
    add('qemu', 'fail', 'qemu-system-x86_64 not found', 'apt-get install qemu-system-x86 qemu-utils')
  else {
    const v: [number, number] = [Number(m[1]), Number(m[2])]
    const new_ = v[0] > QEMU_MIN[0] || (v[0] === QEMU_MIN[0] && v[1] >= QEMU_MIN[1])
    add(
      'qemu',
      new_ ? 'ok' : 'fail',
      `QEMU ${m[1]}.${m[2]}${m[3] ?? ''}`,
      `QEMU ${QEMU_MIN.join('.')} or newer is needed (Debian 12: apt-get install qemu-system-x86)`,
    )
  }

  // Same rule as the QEMU driver (vm/qemu/args.ts kvmUsable): /dev/kvm backed by kvm_intel or kvm_amd.
  const hwKvm = h.exists('/sys/module/kvm_intel') || h.exists('/sys/module/kvm_amd')
  if (h.rw('/dev/kvm') && hwKvm) add('accel', 'ok', 'KVM (hardware virtualization)')
  else
    add(
      'accel',
      'warn',
      h.rw('/dev/kvm')
        ? '/dev/kvm is not hardware KVM (e.g. PVM): guests run under TCG, several times slower'
        : 'no usable /dev/kvm: guests run under TCG, several times slower',
      'use a host with kvm_intel or kvm_amd (on a cloud VM: an instance type with nested virtualization); MESH_ACCEL=kvm|tcg overrides the choice',
    )

  const sys = (k: string) => Number((h.read(`/proc/sys/${k.replaceAll('.', '/')}`) ?? '').trim())
  const rmem = sys('net.core.rmem_max')
  const wmem = sys('net.core.wmem_max')
  add(
    'udp-buffers',
    rmem >= UDP_BUFFER_WANT && wmem >= UDP_BUFFER_WANT ? 'ok' : 'warn',
    `net.core.rmem_max=${rmem || '?'} wmem_max=${wmem || '?'} (WebRTC links want ${UDP_BUFFER_WANT})`,
    `sysctl -w net.core.rmem_max=${UDP_BUFFER_WANT} net.core.wmem_max=${UDP_BUFFER_WANT}, and put both in /etc/sysctl.d/90-mesh.conf (default buffers drop thousands of packets per second under load)`,
  )

  add(
    'userfaultfd',
    h.exists('/proc/sys/vm/unprivileged_userfaultfd') || h.exists('/dev/userfaultfd') ? 'ok' : 'warn',
    h.exists('/proc/sys/vm/unprivileged_userfaultfd') || h.exists('/dev/userfaultfd')
      ? 'available'
      : 'kernel without userfaultfd',
    'a kernel built with CONFIG_USERFAULTFD (every Debian kernel): post-copy migration needs it',
  )

  // cgroup v2: the unified mount (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host).
  const mount = /^\S+ (\S+) cgroup2 /m.exec(h.read('/proc/mounts') ?? '')?.[1]
  const controllers = mount === undefined ? undefined : h.read(`${mount}/cgroup.controllers`)
  if (mount === undefined || controllers === undefined)
    add(
      'cgroup-v2',
      'warn',
      'no cgroup v2 mounted',
      'boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1): guest CPU limits need it',
    )
  else
    add(
      'cgroup-v2',
      controllers.split(/\s+/).includes('cpu') ? 'ok' : 'warn',
      `${mount}, controllers: ${controllers.trim() || 'none'}`,
      'the cpu controller must be on cgroup v2 (boot with systemd.unified_cgroup_hierarchy=1): guest CPU limits need it',
    )

  const tun = h.exists('/dev/net/tun')
  const socat = h.run('socat', ['-V'])?.status === 0
  const ip = h.run('ip', ['-V'])?.status === 0
  add(
    'tap',
    tun && socat && ip ? 'ok' : 'warn',
    tun && socat && ip
      ? '/dev/net/tun, socat and ip present'
      : `missing: ${[!tun && '/dev/net/tun', !socat && 'socat', !ip && 'ip'].filter(Boolean).join(', ')}`,
    "'--tap' and 'mesh expose' need them: modprobe tun; apt-get install socat iproute2",
  )

  const shm = h.freeBytes('/dev/shm')
  add(
    'guest-ram',
    shm !== undefined && shm >= 1024 ** 3 ? 'ok' : 'warn',
    shm === undefined
      ? '/dev/shm not found'
      : `/dev/shm has ${(shm / 1024 ** 3).toFixed(1)} GiB free (guest RAM lives there)`,
    'mount a tmpfs on /dev/shm at least as large as the guests this host runs plus one incoming guest',
  )

  const sync = h.run('timedatectl', ['show', '-p', 'NTPSynchronized', '--value'])
  const synced =
    sync?.status === 0
      ? sync.stdout.trim() === 'yes'
      : h.exists('/run/systemd/timesync/synchronized')
        ? true
        : undefined
  add(
    'clock-sync',
    synced === true ? 'ok' : 'warn',
    synced === true
      ? 'NTP synchronized'
      : synced === false
        ? 'NTP not synchronized'
        : 'cannot tell whether the clock is synchronized',
    'run an NTP client (systemd-timesyncd or chrony): migration downtime and invites use the clock',
  )

  const mode = h.mode(stateDir)
  if (mode === undefined)
    add(
      'state-dir',
      'warn',
      `${stateDir} does not exist yet`,
      "'mesh network create' or 'mesh join' creates it",
    )
  else
    add(
      'state-dir',
      (mode & 0o077) === 0 ? 'ok' : 'fail',
      `${stateDir} mode ${mode.toString(8)}`,
      `chmod 700 ${stateDir} (it holds the node's private key)`,
    )
  return out
}

/** What the running agent says about reachability and clocks. */
export interface AgentView {
  listen: string[]
  peers: Array<Pick<PeerRow, 'name' | 'state' | 'link' | 'relayed' | 'direct'>>
  clocks: Array<{ member: string; skewMs?: number; rttMs?: number; error?: string }>
  metrics?: string
  web?: string
  /** The agent's TCP congestion control (net/node/congestion.ts status). */
  tcpCongestion?: {
    wanted?: string
    kernelDefault?: string
    available: readonly string[]
    applied: number
    failed: number
    lastError?: string
  }
}

export const SKEW_WARN_MS = 500

export function agentChecks(a: AgentView | undefined): Check[] {
  if (a === undefined)
    return [
      {
        name: 'agent',
        verdict: 'warn',
        detail: 'no agent runs for this state dir: ports and clock skew not checked',
        fix: "start it ('mesh agent', or 'mesh service install') and run 'mesh doctor' again",
      },
    ]
  const out: Check[] = []
  const tcp = a.listen
    .filter((l) => !l.includes('/p2p-circuit'))
    .map((l) => /\/tcp\/(\d+)/.exec(l)?.[1])
    .filter(Boolean)
  const others = a.peers
  const relayed = others.filter((p) => p.relayed === true)
  const up = others.filter((p) => p.state === 'up')
  out.push({
    name: 'ports',
    verdict: others.length > 0 && relayed.length === others.length ? 'warn' : 'ok',
    detail: `listening on TCP ${[...new Set(tcp)].join(', ') || '?'}; ${up.length}/${others.length} members up, ${relayed.length} reached only through the relay, ${others.filter((p) => p.link === 'open').length} links open`,
    ...(others.length > 0 && relayed.length === others.length
      ? {
          fix: `no member reaches this node directly: forward/open TCP ${[...new Set(tcp)].join(', ')} and start the agent with --announce /ip4/PUBLIC_IP/tcp/PORT for direct bulk paths`,
        }
      : {}),
  })
  for (const [what, addr] of [
    ['metrics', a.metrics],
    ['web', a.web],
  ] as const) {
    if (addr === undefined) continue
    const local = addr.startsWith('127.') || addr.startsWith('[::1]') || addr.startsWith('localhost')
    out.push({
      name: `${what}-bind`,
      verdict: local ? 'ok' : 'warn',
      detail: `${what} served on ${addr}`,
      ...(local ? {} : { fix: `serve ${what} on 127.0.0.1 unless a firewall guards ${addr}` }),
    })
  }
  const cc = a.tcpCongestion
  if (cc !== undefined) {
    const ok = cc.failed === 0 && (cc.wanted === undefined || cc.available.includes(cc.wanted))
    out.push({
      name: 'tcp-congestion',
      verdict: ok ? 'ok' : 'warn',
      detail: `wanted ${cc.wanted ?? 'kernel default'} (kernel default ${cc.kernelDefault ?? '?'}; available ${cc.available.join(' ') || '?'}); set on ${cc.applied} sockets, failed on ${cc.failed}${cc.lastError === undefined ? '' : `: ${cc.lastError}`}`,
      ...(ok
        ? {}
        : {
            fix: `modprobe tcp_${cc.wanted ?? 'bbr'} and add it to net.ipv4.tcp_allowed_congestion_control (cubic collapses under WAN loss)`,
          }),
    })
  }
  const measured = a.clocks.filter((c) => c.skewMs !== undefined)
  const worst = measured.reduce<{ member: string; skewMs?: number } | undefined>(
    (w, c) => (w === undefined || Math.abs(c.skewMs!) > Math.abs(w.skewMs!) ? c : w),
    undefined,
  )
  out.push(
    worst === undefined
      ? {
          name: 'clock-skew',
          verdict: a.clocks.length === 0 ? 'ok' : 'warn',
          detail: a.clocks.length === 0 ? 'no other member to compare with' : 'no member answered',
          ...(a.clocks.length === 0 ? {} : { fix: "check 'mesh peers'" }),
        }
      : {
          name: 'clock-skew',
          verdict: Math.abs(worst.skewMs!) <= SKEW_WARN_MS ? 'ok' : 'warn',
          detail: `largest skew ${worst.skewMs} ms (${worst.member}) over ${measured.length} members`,
          ...(Math.abs(worst.skewMs!) <= SKEW_WARN_MS
            ? {}
            : { fix: `synchronize the clocks of this host and ${worst.member} (NTP)` }),
        },
  )
  return out
}
