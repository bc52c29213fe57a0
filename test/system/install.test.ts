/**
 * `npm pack` → `npm install -g` of the tarball into a scratch prefix, as an operator installs mesh on a
 * fresh host: the installed `mesh` runs from its bundle alone (no sources, no TypeScript loader, no
 * install script), carries the werift patch, creates a network, runs an agent that answers `status`,
 * checks the host, and writes a unit pointing at itself.
 */
import assert from 'node:assert/strict'
import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { REPO_ROOT } from '../../fixtures/testnet/testnet.ts'

describe('install: npm pack, then npm install -g of the tarball', function () {
  this.timeout(180_000)
  const dir = mkdtempSync(join(tmpdir(), 'mesh-install-'))
  const prefix = join(dir, 'prefix')
  const mesh = join(prefix, 'bin', 'mesh')
  const pkg = join(prefix, 'lib', 'node_modules', 'mesh')
  let agent: ChildProcess | undefined

  after(async () => {
    if (agent !== undefined && agent.exitCode === null) {
      const exited = new Promise((r) => agent!.once('exit', r))
      agent.kill('SIGTERM')
      await exited
    }
    rmSync(dir, { recursive: true, force: true })
  })

  it('packs only the bundle and installs a working mesh without running any install script', () => {
    execFileSync('npm', ['pack', '--pack-destination', dir, '--silent'], { cwd: REPO_ROOT, stdio: 'pipe' })
    const tgz = readdirSync(dir).find((f) => f.endsWith('.tgz'))!
    const files = execFileSync('tar', ['tzf', join(dir, tgz)], { encoding: 'utf8' })
      .split('\n')
      .filter(Boolean)
    assert.ok(files.includes('package/dist/main.js'))
    assert.ok(files.includes('package/bin/mesh.js'))
    assert.ok(
      !files.some((f) => /^package\/(src|net|vm|test|fixtures|scripts|patches)\//.test(f)),
      files.join(' '),
    )
    // Only this build's chunks: every .js in dist/ is listed in its build-info.json.
    const info = JSON.parse(
      execFileSync('tar', ['xzOf', join(dir, tgz), 'package/dist/build-info.json'], { encoding: 'utf8' }),
    ) as { outputs: string[] }
    const packed = files
      .filter((f) => f.startsWith('package/dist/') && f !== 'package/dist/build-info.json')
      .map((f) => f.slice('package/dist/'.length))
    assert.deepEqual(packed.sort(), [...info.outputs].sort())
    execFileSync(
      'npm',
      ['install', '-g', '--prefix', prefix, join(dir, tgz), '--no-audit', '--no-fund', '--prefer-offline'],
      {
        stdio: 'pipe',
        env: { ...process.env, npm_config_loglevel: 'error' },
      },
    )
    assert.ok(existsSync(mesh))
    assert.ok(!existsSync(join(pkg, 'src')))
    assert.equal(
      execFileSync(mesh, ['--version'], { encoding: 'utf8' }).trim(),
      JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')).version,
    )
    const dist = join(pkg, 'dist')
    assert.ok(
      readdirSync(dist).some(
        (f) => f.endsWith('.js') && readFileSync(join(dist, f), 'utf8').includes('sackCoalesce'),
      ),
      'the installed bundle lacks the werift patch',
    )
  })

  it('runs an agent from the installed package and answers status, doctor and service install', async () => {
    const state = join(dir, 'state')
    execFileSync(mesh, ['network', 'create', 'installed', '--state', state], { stdio: 'pipe' })
    agent = spawn(mesh, ['agent', '--state', state, '--listen', '/ip4/127.0.0.1/tcp/0'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    })
    let log = ''
    agent.stderr!.on('data', (b: Buffer) => {
      log += b.toString()
    })
    const until = Date.now() + 60_000
    while (!existsSync(join(state, 'control.sock'))) {
      if (agent.exitCode !== null || Date.now() > until)
        throw new Error(`the installed agent did not start: ${log}`)
      await new Promise((r) => setTimeout(r, 100))
    }
    const st = JSON.parse(
      execFileSync(mesh, ['status', '--json', '--state', state], { encoding: 'utf8' }),
    ) as { net: { network: { name: string } } }
    assert.equal(st.net.network.name, 'installed')
    const doc = spawnSync(mesh, ['doctor', '--json', '--state', state], { encoding: 'utf8' })
    const checks = (JSON.parse(doc.stdout) as { checks: Array<{ name: string; verdict: string }> }).checks
    assert.equal(checks.find((c) => c.name === 'state-dir')?.verdict, 'ok')
    assert.ok(
      checks.some((c) => c.name === 'ports'),
      'the doctor did not see the running agent',
    )
    const unit = execFileSync(mesh, ['service', 'install', '--print'], { encoding: 'utf8' })
    assert.match(unit, new RegExp(`^ExecStart=\\S+ ${pkg.replaceAll('/', '\\/')}/bin/mesh\\.js agent `, 'm'))
  })
})
