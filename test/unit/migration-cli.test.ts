import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseMigrateParams } from '../../src/agent/services/migration.ts'
import { parseDuration } from '../../src/commands/migrate.ts'
import { statePaths } from '../../src/config.ts'
import { type ControlServer, createControlServer } from '../../src/control/server.ts'

const bin = fileURLToPath(new URL('../../bin/mesh.js', import.meta.url))

function mesh(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    p.stdout.on('data', (d: Buffer) => {
      stdout += d.toString()
    })
    p.stderr.on('data', (d: Buffer) => {
      stderr += d.toString()
    })
    const timer = setTimeout(() => p.kill('SIGKILL'), 20_000)
    p.on('close', (status) => {
      clearTimeout(timer)
      resolve({ status, stdout, stderr })
    })
  })
}

describe('mesh migrate (CLI against a stub agent)', function () {
  this.timeout(30_000)
  let dir: string
  let server: ControlServer | undefined
  const calls: unknown[] = []

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'mig-cli-'))
    server = createControlServer({
      path: statePaths(dir).controlSocket,
      handlers: {
        migrate: async (params, ctx) => {
          calls.push(params)
          const p = parseMigrateParams(params)
          ctx.emit({
            vm: p.vm,
            phase: 'bulk',
            round: 0,
            wireBytes: 1000,
            ramBytes: 4096,
            dedupBytes: 0,
            rateBytesPerSec: 1e6,
            dirtyRateBytesPerSec: 0,
            dirtyBytes: 0,
            elapsedMs: 5,
          })
          return {
            vm: p.vm,
            from: 'A',
            to: p.to,
            token: 2,
            totalMs: 1234,
            downtimeMs: 56,
            downtimeSourceMs: 57,
            rttMs: 0.5,
            wireBytes: 1000,
            dedupBytes: 2048,
            dupPageBytes: 0,
            ramBytes: 4096,
            rounds: 1,
            finalDeltaBytes: 10,
            deviceStateBytes: 300_000,
            switchReason: 'small',
            timings: {},
          }
        },
      },
    })
    await server.start()
  })
  after(async () => {
    await server?.stop()
    await rm(dir, { recursive: true, force: true })
  })

  it('parses durations and refuses bad params', () => {
    assert.equal(parseDuration('25s'), 25_000)
    assert.equal(parseDuration('1500ms'), 1500)
    assert.equal(parseDuration('2m'), 120_000)
    assert.throws(() => parseDuration('soon'))
    assert.throws(() => parseMigrateParams({ vm: '../x', to: 'B' }), { name: 'UsageError' })
    assert.throws(() => parseMigrateParams({ vm: 'g', to: 'B', deadlineMs: 10 }), { name: 'UsageError' })
    assert.deepEqual(parseMigrateParams({ vm: 'g', to: 'B', deadlineMs: 25_000 }), {
      vm: 'g',
      to: 'B',
      deadlineMs: 25_000,
    })
  })

  it('sends {vm, to, deadlineMs}, streams events with --json and prints the report', async () => {
    const r = await mesh(['migrate', 'g1', '--to', 'B', '--deadline', '25s', '--json', '--state', dir])
    assert.equal(r.status, 0, r.stderr)
    assert.deepEqual(calls.at(-1), { vm: 'g1', to: 'B', deadlineMs: 25_000 })
    const report = JSON.parse(r.stdout) as { event: string; downtimeMs: number; token: number }
    assert.equal(report.event, 'done')
    assert.equal(report.downtimeMs, 56)
    assert.match(r.stderr, /"event":"progress"/)
    const text = await mesh(['migrate', 'g1', '--to', 'B', '--state', dir])
    assert.equal(text.status, 0, text.stderr)
    assert.match(text.stdout, /moved g1: A → B \(token 2\)/)
    assert.match(text.stdout, /downtime +56 ms/)
  })

  it('without --to it is a usage error (exit 2)', async () => {
    const r = await mesh(['migrate', 'g1', '--state', dir])
    assert.equal(r.status, 2)
  })
})
