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
          if (p.vm === 'dies') {
            // The agent dies in the switch: the CLI must say where the VM was last seen.
            ctx.emit({
              vm: p.vm,
              phase: 'switch',
              round: 2,
              wireBytes: 1000,
              ramBytes: 4096,
              dedupBytes: 0,
              rateBytesPerSec: 1e6,
              dirtyRateBytesPerSec: 0,
              dirtyBytes: 0,
              elapsedMs: 3200,
              from: 'gcp1',
              to: 'aws1',
            })
            setTimeout(() => void server?.stop(), 200)
            return new Promise(() => {})
          }
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
            ...(p.vm === 'late'
              ? { totalMs: 31_000, deadlineMs: 25_000, fromName: 'gcp1', toName: 'aws1' }
              : {}),
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

  it('sends {vm, to, deadlineMs}; --json prints one JSON object per line on stdout (events, then the report)', async () => {
    const r = await mesh(['migrate', 'g1', '--to', 'B', '--deadline', '25s', '--json', '--state', dir])
    assert.equal(r.status, 0, r.stderr)
    assert.deepEqual(calls.at(-1), { vm: 'g1', to: 'B', deadlineMs: 25_000 })
    const lines = r.stdout.trimEnd().split('\n')
    const objs = lines.map((l) => JSON.parse(l) as { event: string; phase?: string; downtimeMs?: number })
    assert.deepEqual(
      objs.map((o) => o.event),
      ['progress', 'done'],
    )
    assert.equal(objs[0]!.phase, 'bulk')
    assert.equal(objs[1]!.downtimeMs, 56)
    assert.equal(r.stderr, '', 'nothing on stderr for a clean move')
    const text = await mesh(['migrate', 'g1', '--to', 'B', '--state', dir])
    assert.equal(text.status, 0, text.stderr)
    assert.match(text.stdout, /moved g1: A → B \(token 2\)/)
    assert.match(text.stdout, /downtime +56 ms/)
  })

  it('a missed --deadline is a warning and exit status 3 (the report still printed)', async () => {
    const r = await mesh(['migrate', 'late', '--to', 'aws1', '--deadline', '25s', '--json', '--state', dir])
    assert.equal(r.status, 3, r.stderr)
    const objs = r.stdout
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l) as { event: string; code?: string; deadlineMissed?: boolean })
    assert.deepEqual(
      objs.map((o) => o.event),
      ['progress', 'warning', 'done'],
    )
    assert.equal(objs[1]!.code, 'E_DEADLINE_MISSED')
    assert.equal(objs[2]!.deadlineMissed, true)
    assert.match(r.stderr, /mesh: VM 'late' moved to aws1, but after 31\.0 s: the deadline was 25\.0 s/)
    const text = await mesh(['migrate', 'late', '--to', 'aws1', '--deadline', '25s', '--state', dir])
    assert.equal(text.status, 3)
    assert.match(text.stdout, /moved late: gcp1 → aws1/)
  })

  it('without --to it is a usage error (exit 2)', async () => {
    const r = await mesh(['migrate', 'g1', '--state', dir])
    assert.equal(r.status, 2)
  })

  // Last: the stub agent goes away.
  it('the agent dies mid-move: the CLI says where the VM was last seen (text, and a failed event with --json)', async () => {
    const r = await mesh(['migrate', 'dies', '--to', 'aws1', '--json', '--state', dir])
    assert.equal(r.status, 1)
    const objs = r.stdout
      .trimEnd()
      .split('\n')
      .map(
        (l) => JSON.parse(l) as { event: string; code?: string; lastKnown?: { on?: string; phase?: string } },
      )
    assert.deepEqual(
      objs.map((o) => o.event),
      ['progress', 'failed'],
    )
    assert.equal(objs[1]!.code, 'E_AGENT_LOST')
    assert.deepEqual(objs[1]!.lastKnown, { status: 'unknown', on: 'gcp1', phase: 'switch' })
    assert.match(
      r.stderr,
      /the agent stopped during the move.*VM 'dies' was last seen paused on gcp1 in the switch to aws1/,
    )
  })
})
