import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { hasCommand } from '../../fixtures/testnet/prereq.ts'
import { renderUnit } from '../../src/ops/systemd-unit.ts'

const BIN = fileURLToPath(new URL('../../bin/mesh.js', import.meta.url))

describe('mesh service install (systemd unit)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mesh-service-'))
  after(() => rmSync(dir, { recursive: true, force: true }))

  it('writes a hardened unit for this installation that systemd-analyze verifies without a warning', function () {
    this.timeout(30_000)
    const r = spawnSync(
      process.execPath,
      [
        BIN,
        'service',
        'install',
        '--unit-dir',
        dir,
        '--state',
        join(dir, 'state'),
        '--config',
        join(dir, 'agent.json'),
      ],
      { encoding: 'utf8' },
    )
    assert.equal(r.status, 0, r.stderr)
    const file = join(dir, 'mesh-agent.service')
    const unit = readFileSync(file, 'utf8')
    assert.match(
      unit,
      new RegExp(
        `^ExecStart=${process.execPath} \\S+/bin/mesh\\.js agent --config ${dir}/agent\\.json --state ${dir}/state$`,
        'm',
      ),
    )
    assert.match(unit, /^CapabilityBoundingSet=CAP_NET_ADMIN$/m)
    assert.match(unit, /^Restart=on-failure$/m)
    assert.match(unit, /^KillMode=process$/m)
    assert.match(unit, /^ProtectSystem=strict$/m)
    assert.equal(statSync(join(dir, 'state')).mode & 0o777, 0o700)
    if (!hasCommand('systemd-analyze')) {
      if (process.env.CI === 'true')
        assert.fail('systemd-analyze missing in CI (npm run setup installs systemd)')
      return
    }
    const v = spawnSync('systemd-analyze', ['verify', file], { encoding: 'utf8' })
    assert.equal(v.status, 0, v.stderr)
    assert.equal(v.stderr.trim(), '', 'systemd-analyze warned')
  })

  it('adds CAP_NET_BIND_SERVICE only when asked, and quotes paths with spaces', () => {
    const u = renderUnit({
      node: '/usr/bin/node',
      bin: '/opt/my mesh/bin/mesh.js',
      stateDir: '/var/lib/mesh',
      configFile: '/etc/mesh/agent.json',
      bindLowPorts: true,
    })
    assert.match(u, /^CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE$/m)
    assert.match(u, /^ExecStart=\/usr\/bin\/node "\/opt\/my mesh\/bin\/mesh\.js" agent/m)
  })
})
