import assert from 'node:assert/strict'
import { spawn, spawnSync } from 'node:child_process'
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { ensureGuest, type GuestImage } from '../../fixtures/guest/build.ts'
import { READY_RE } from '../../fixtures/guest/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { runDirFor } from '../../src/agent/services/vm.ts'
import { processAlive } from '../../src/base/process.ts'

const bin = fileURLToPath(new URL('../../bin/mesh.js', import.meta.url))
const ramDir = `/dev/shm/mvt-cli-${process.pid}`

interface Run {
  status: number | null
  stdout: string
  stderr: string
}

/** Runs the CLI asynchronously (a sync spawn would block the event loop for the whole command). */
function mesh(...args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [bin, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, MESH_RAM_DIR: ramDir },
    })
    let stdout = ''
    let stderr = ''
    p.stdout.on('data', (d) => {
      stdout += d
    })
    p.stderr.on('data', (d) => {
      stderr += d
    })
    const timer = setTimeout(() => p.kill('SIGKILL'), 180_000)
    p.on('close', (status) => {
      clearTimeout(timer)
      resolve({ status, stdout, stderr })
    })
  })
}

interface VmInfoJson {
  name: string
  status: string
  pid: number
  memoryPath: string
  exit?: { code: number | null; signal: string | null; lastLines: string[] }
}

describe('mesh vm (standalone, no agent)', function () {
  this.timeout(600_000)
  let state: string
  let guest: GuestImage
  const pids: number[] = []

  before(async function () {
    requireOrSkip(this, { commands: ['qemu-system-x86_64'] })
    guest = await ensureGuest()
    state = await mkdtemp(join(tmpdir(), 'vm-cli-'))
  })
  after(async () => {
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL')
      } catch {}
    }
    await rm(ramDir, { recursive: true, force: true })
    if (state !== undefined) {
      await rm(runDirFor(state), { recursive: true, force: true })
      await rm(state, { recursive: true, force: true })
    }
  })

  it('run, ls, console, a QEMU death reported by ls, stop; nothing left behind', async () => {
    const specFile = join(state, 'vm.json')
    const name = `cli${process.pid}`
    await writeFile(
      specFile,
      JSON.stringify({
        name,
        memoryMiB: 128,
        kernel: guest.kernel,
        initrd: guest.initrd,
        ip: '10.9.0.2/24',
        cmdline: 'quiet',
      }),
    )
    const run = await mesh('vm', 'run', specFile, '--state', state, '--json')
    assert.equal(run.status, 0, run.stderr)
    const info = JSON.parse(run.stdout) as VmInfoJson
    pids.push(info.pid)
    assert.equal(info.name, name)
    assert.equal(info.status, 'running')

    // A new process re-adopts the VM through its QMP socket.
    const ls = await mesh('vm', 'ls', '--state', state, '--json')
    assert.equal(ls.status, 0, ls.stderr)
    const vms = (JSON.parse(ls.stdout) as { vms: VmInfoJson[] }).vms
    assert.deepEqual(
      vms.map((v) => [v.name, v.status, v.pid]),
      [[name, 'running', info.pid]],
    )
    const text = await mesh('vm', 'ls', '--state', state)
    assert.match(text.stdout, /^NAME\s+STATUS/)
    assert.match(text.stdout, new RegExp(`${name}\\s+running`))

    let consoleOut = ''
    const deadline = Date.now() + 240_000
    while (Date.now() < deadline && !READY_RE.test(consoleOut)) {
      const c = await mesh('vm', 'console', name, '--state', state, '-n', '200')
      assert.equal(c.status, 0, c.stderr)
      consoleOut = c.stdout
      if (!READY_RE.test(consoleOut)) await sleep(2000)
    }
    assert.match(consoleOut, READY_RE)

    // QEMU dies while no manager watches: the next command reports it with its last lines.
    process.kill(info.pid, 'SIGKILL')
    // The kill is asynchronous: ask until the process is gone (or a zombie), not for a fixed time.
    let dead: VmInfoJson | undefined
    for (const until = Date.now() + 15_000; Date.now() < until; await sleep(100)) {
      const after = await mesh('vm', 'ls', '--state', state, '--json')
      dead = (JSON.parse(after.stdout) as { vms: VmInfoJson[] }).vms[0]
      if (dead?.status !== 'running') break
    }
    assert.equal(dead?.status, 'exited')
    assert.ok(
      dead?.exit?.lastLines.some((l) => READY_RE.test(l)),
      JSON.stringify(dead?.exit),
    )
    assert.equal(spawnSync('test', ['-e', info.memoryPath]).status, 1, 'RAM file removed')
    const stop = await mesh('vm', 'stop', name, '--state', state)
    assert.equal(stop.status, 0, stop.stderr)
    const empty = await mesh('vm', 'ls', '--state', state, '--json')
    assert.deepEqual((JSON.parse(empty.stdout) as { vms: VmInfoJson[] }).vms, [])

    // run + stop through the CLI: the QEMU is gone, its files too.
    const run2 = await mesh('vm', 'run', specFile, '--state', state, '--json')
    assert.equal(run2.status, 0, run2.stderr)
    const info2 = JSON.parse(run2.stdout) as VmInfoJson
    pids.push(info2.pid)
    const stop2 = await mesh('vm', 'stop', name, '--state', state, '--json')
    assert.equal(stop2.status, 0, stop2.stderr)
    assert.equal((JSON.parse(stop2.stdout) as VmInfoJson).status, 'stopped')
    assert.equal(
      processAlive(info2.pid),
      false,
      'QEMU gone (exited; a zombie until init reaps it counts as gone)',
    )
    assert.equal(spawnSync('test', ['-e', info2.memoryPath]).status, 1, 'RAM file removed')
    assert.deepEqual(await readdir(runDirFor(state)), [])
    assert.deepEqual(await readdir(ramDir), [])
  })

  it('bad spec and unknown VM: one-line errors that name the problem', async () => {
    const bad = join(state, 'bad.json')
    await writeFile(bad, JSON.stringify({ name: 'x', memoryMiB: 'lots', kernel: guest.kernel }))
    const r = await mesh('vm', 'run', bad, '--state', state)
    assert.equal(r.status, 2)
    assert.match(r.stderr, /^mesh: spec\.memoryMiB: must be an integer/)
    assert.equal(r.stderr.trim().split('\n').length, 1)
    const missing = join(state, 'missing.json')
    await writeFile(missing, JSON.stringify({ name: 'y', memoryMiB: 64, kernel: join(state, 'no-kernel') }))
    const m = await mesh('vm', 'run', missing, '--state', state)
    assert.equal(m.status, 1)
    assert.match(m.stderr, /spec\.kernel: cannot read/)
    const s = await mesh('vm', 'stop', 'nosuch', '--state', state)
    assert.equal(s.status, 1)
    assert.match(s.stderr, /no VM named 'nosuch'/)
  })
})
