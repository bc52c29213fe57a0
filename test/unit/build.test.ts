import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { DIST, staleReason } from '../../scripts/build.mjs'

const BIN = fileURLToPath(new URL('../../bin/mesh.js', import.meta.url))

describe('build: the compiled bundle users run', () => {
  before(function () {
    this.timeout(60_000)
    // bin/mesh.js rebuilds dist/ when a source changed since the last build.
    execFileSync(process.execPath, [BIN, '--version'])
  })

  it('is fresh after the bin ran, and the bin runs it', () => {
    assert.equal(staleReason(), undefined)
    const help = execFileSync(process.execPath, [BIN, '--help'], { encoding: 'utf8' })
    assert.match(help, /Usage: mesh/)
    assert.match(help, /migrate/)
  })

  it('knows it is stale when a file the build read changed or is gone', () => {
    const root = mkdtempSync(join(tmpdir(), 'mesh-build-test-'))
    try {
      mkdirSync(join(root, 'dist'))
      mkdirSync(join(root, 'src'))
      writeFileSync(join(root, 'src/a.ts'), 'export const a = 1\n')
      utimesSync(join(root, 'src/a.ts'), 1000, 1000)
      const info = { inputs: [['src/a.ts', 1_000_000, 19]], outputs: ['main.js'] }
      writeFileSync(join(root, 'dist/build-info.json'), JSON.stringify(info))
      assert.equal(staleReason(root), undefined)
      writeFileSync(join(root, 'src/a.ts'), 'export const a = 2\n')
      assert.match(staleReason(root) ?? '', /src\/a\.ts changed/)
      rmSync(join(root, 'src/a.ts'))
      assert.match(staleReason(root) ?? '', /src\/a\.ts is gone/)
      rmSync(join(root, 'dist/build-info.json'))
      assert.match(staleReason(root) ?? '', /not been built/)
    } finally {
      rmSync(root, { recursive: true, force: true })
    }
  })

  it('keeps the CLI entry small: no WebRTC or libp2p until a command needs them', () => {
    const entry = readFileSync(join(DIST, 'main.js'), 'utf8')
    assert.ok(entry.length < 200_000, `dist/main.js is ${entry.length} bytes`)
    for (const heavy of ['RTCPeerConnection', 'createLibp2p', 'circuitRelayServer', 'QMP'])
      assert.ok(!entry.includes(heavy), `dist/main.js contains ${heavy}`)
  })

  it('carries the werift patch (patch-package ran before the build): an installed package needs no install script', () => {
    const chunks = readdirSync(DIST).filter((f) => f.endsWith('.js'))
    assert.ok(
      chunks.some((f) => readFileSync(join(DIST, f), 'utf8').includes('sackCoalesce')),
      'no chunk has the patched SACK coalescing',
    )
  })
})
