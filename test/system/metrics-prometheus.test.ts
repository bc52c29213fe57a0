import assert from 'node:assert/strict'
import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { MESH_BIN, mesh } from '../../fixtures/testnet/testnet.ts'
import { freePort, PROMETHEUS, type PrometheusServer, startPrometheus } from '../helpers/prometheus.ts'

describe('metrics: a real Prometheus scrapes a real agent', function () {
  this.timeout(90_000)
  let dir = ''
  let agent: ChildProcess | undefined
  let prom: PrometheusServer | undefined
  let metricsAddr = ''

  before(async function () {
    requireOrSkip(this, { commands: [PROMETHEUS] })
    dir = mkdtempSync(join(tmpdir(), 'mesh-metrics-'))
    const state = join(dir, 'a')
    const r = await mesh(['network', 'create', 'prom', '--state', state])
    assert.equal(r.code, 0, r.stderr)
    metricsAddr = `127.0.0.1:${await freePort()}`
    agent = spawn(
      process.execPath,
      [MESH_BIN, 'agent', '--state', state, '--listen', '/ip4/127.0.0.1/tcp/0', '--metrics', metricsAddr],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    )
    const until = Date.now() + 60_000
    while (!existsSync(join(state, 'control.sock'))) {
      if (agent.exitCode !== null || Date.now() > until) throw new Error('the agent did not start')
      await new Promise((res) => setTimeout(res, 100))
    }
  })

  after(async () => {
    await prom?.stop()
    if (agent !== undefined && agent.exitCode === null) {
      const exited = new Promise((r) => agent!.once('exit', r))
      agent.kill('SIGTERM')
      await exited
    }
    if (dir !== '') rmSync(dir, { recursive: true, force: true })
  })

  it('serves conventional names on /metrics, loopback only, and 404 elsewhere', async () => {
    const text = await (await fetch(`http://${metricsAddr}/metrics`)).text()
    for (const name of [
      '# TYPE mesh_link_rtt_seconds gauge',
      '# TYPE mesh_migration_duration_seconds histogram',
      '# TYPE mesh_migration_downtime_seconds histogram',
      '# TYPE mesh_chunk_fetch_bytes_total counter',
      '# TYPE mesh_tunnel_frames_total counter',
      '# TYPE mesh_tunnel_drops_total counter',
      '# TYPE mesh_vms gauge',
      'mesh_members{state="self"} 1',
      'mesh_vms{state="running"} 0',
      'process_resident_memory_bytes',
    ])
      assert.ok(text.includes(name), `missing ${name}`)
    assert.equal((await fetch(`http://${metricsAddr}/`)).status, 404)
  })

  it("answers through Prometheus's HTTP API", async () => {
    prom = await startPrometheus({ targets: [metricsAddr], port: await freePort() })
    const up = await prom.waitFor('up{job="mesh"}', (r) => r[0]?.value[1] === '1', 30_000)
    assert.equal(up.length, 1)
    const self = await prom.waitFor('mesh_members{state="self"}', (r) => r.length === 1, 30_000)
    assert.equal(self[0]!.value[1], '1')
    const rss = await prom.waitFor('process_resident_memory_bytes{job="mesh"}', (r) => r.length === 1, 30_000)
    assert.ok(Number(rss[0]!.value[1]) > 10e6)
  })
})
