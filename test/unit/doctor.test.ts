import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { agentChecks, type HostProbe, hostChecks } from '../../src/ops/doctor.ts'

const BIN = fileURLToPath(new URL('../../bin/mesh.js', import.meta.url))

function fakeHost(o: {
  files?: Record<string, string>
  rw?: string[]
  cmds?: Record<string, string>
  node?: string
  shm?: number
  mode?: number
}): HostProbe {
  const files = o.files ?? {}
  return {
    nodeVersion: o.node ?? '20.20.2',
    read: (p) => files[p],
    exists: (p) => p in files || (o.rw ?? []).includes(p),
    rw: (p) => (o.rw ?? []).includes(p),
    run: (cmd) => (o.cmds?.[cmd] === undefined ? undefined : { status: 0, stdout: o.cmds[cmd]! }),
    freeBytes: () => o.shm,
    mode: () => o.mode,
  }
}
const verdict = (checks: ReturnType<typeof hostChecks>, name: string) => checks.find((c) => c.name === name)

describe('mesh doctor', () => {
  it('passes a well-set host and says what is missing on a bare one, with a fix for each', () => {
    const good = hostChecks(
      fakeHost({
        files: {
          '/proc/sys/net/core/rmem_max': '4194304\n',
          '/proc/sys/net/core/wmem_max': '8388608\n',
          '/proc/sys/vm/unprivileged_userfaultfd': '0\n',
          '/proc/mounts': 'cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n',
          '/sys/fs/cgroup/cgroup.controllers': 'cpuset cpu io memory pids\n',
          '/sys/module/kvm_intel': '',
          '/dev/net/tun': '',
        },
        rw: ['/dev/kvm'],
        cmds: {
          'qemu-system-x86_64': 'QEMU emulator version 7.2.22 (Debian)',
          socat: 'socat 1.7',
          ip: 'ip utility',
          timedatectl: 'yes\n',
        },
        shm: 8 * 1024 ** 3,
        mode: 0o700,
      }),
      '/var/lib/mesh',
    )
    assert.deepEqual(
      good.filter((c) => c.verdict !== 'ok').map((c) => c.name),
      [],
    )
    const bare = hostChecks(
      fakeHost({
        node: '18.19.0',
        cmds: { 'qemu-system-x86_64': 'QEMU emulator version 6.2.0' },
        mode: 0o755,
      }),
      '/var/lib/mesh',
    )
    for (const [name, v] of [
      ['node', 'fail'],
      ['qemu', 'fail'],
      ['accel', 'warn'],
      ['udp-buffers', 'warn'],
      ['userfaultfd', 'warn'],
      ['cgroup-v2', 'warn'],
      ['tap', 'warn'],
      ['state-dir', 'fail'],
    ] as const) {
      assert.equal(verdict(bare, name)?.verdict, v, name)
      assert.ok((verdict(bare, name)?.fix ?? '').length > 10, `${name} has no fix`)
    }
    assert.match(verdict(bare, 'udp-buffers')!.fix!, /sysctl -w net\.core\.rmem_max=4194304/)
  })

  it("reads the agent's view: relayed-only members, public metrics, clock skew", () => {
    const checks = agentChecks({
      listen: ['/ip4/10.0.0.2/tcp/4001/p2p/x', '/ip4/1.2.3.4/tcp/4001/p2p/b/p2p-circuit/p2p/x'],
      peers: [
        { name: 'b', state: 'up', link: 'open', relayed: true },
        { name: 'c', state: 'up', link: 'open', relayed: true },
      ],
      clocks: [
        { member: 'b', skewMs: 30 },
        { member: 'c', skewMs: -2100 },
      ],
      metrics: '0.0.0.0:9464',
    })
    assert.equal(checks.find((c) => c.name === 'ports')?.verdict, 'warn')
    assert.match(checks.find((c) => c.name === 'ports')!.fix!, /TCP 4001/)
    assert.equal(checks.find((c) => c.name === 'metrics-bind')?.verdict, 'warn')
    const skew = checks.find((c) => c.name === 'clock-skew')!
    assert.equal(skew.verdict, 'warn')
    assert.match(skew.detail, /-2100 ms \(c\)/)
    assert.equal(agentChecks(undefined)[0]?.verdict, 'warn')
  })

  it('runs on this host through the CLI and prints JSON', function () {
    this.timeout(30_000)
    const r = spawnSync(process.execPath, [BIN, 'doctor', '--json', '--state', '/nonexistent/mesh'], {
      encoding: 'utf8',
    })
    const out = JSON.parse(r.stdout) as { ok: boolean; checks: Array<{ name: string }> }
    assert.equal(r.status, out.ok ? 0 : 1)
    for (const n of [
      'node',
      'qemu',
      'accel',
      'udp-buffers',
      'userfaultfd',
      'cgroup-v2',
      'clock-sync',
      'agent',
    ])
      assert.ok(
        out.checks.some((c) => c.name === n),
        n,
      )
  })
})
