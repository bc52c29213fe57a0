import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'

const bin = fileURLToPath(new URL('../../bin/mesh.js', import.meta.url))

function mesh(...args: string[]) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', timeout: 20_000 })
  return { status: r.status, stdout: r.stdout, stderr: r.stderr }
}

describe('mesh CLI', function () {
  this.timeout(30_000)

  it('--help lists the commands and exits 0', () => {
    const r = mesh('--help')
    assert.equal(r.status, 0, r.stderr)
    assert.match(r.stdout, /Usage: mesh/)
    assert.match(r.stdout, /--version/)
  })

  it('--version prints the package version', () => {
    const r = mesh('--version')
    assert.equal(r.status, 0)
    assert.match(r.stdout.trim(), /^\d+\.\d+\.\d+$/)
  })

  it('an unknown command exits 2 with exactly one line on stderr', () => {
    const r = mesh('nosuch')
    assert.equal(r.status, 2)
    const lines = r.stderr.trim().split('\n')
    assert.equal(lines.length, 1, r.stderr)
    assert.match(lines[0]!, /^mesh: /)
    assert.equal(r.stdout, '')
  })
})
