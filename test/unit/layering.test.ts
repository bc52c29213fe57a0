/**
 * The layering rules (ARCHITECTURE.md) are enforced by Biome's noRestrictedImports overrides in
 * biome.json. This suite proves that they bite: it copies the project's biome.json into a scratch tree
 * with the same folders, writes one probe file per rule there, and expects Biome to flag exactly the
 * imports that go the wrong way (and to accept the allowed ones).
 */
import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = fileURLToPath(new URL('../..', import.meta.url))
const BIOME = join(ROOT, 'node_modules/.bin/biome')

interface Probe {
  file: string
  imports: string[]
  /** How many of `imports` must be reported as layering violations. */
  violations: number
}

const PROBES: Probe[] = [
  {
    file: 'net/link/probe.ts',
    imports: [
      '../../src/agent/run.ts',
      '../../test/helpers/vm.ts',
      '../../vm/spec.ts',
      '../../src/base/errors.ts',
    ],
    violations: 3,
  },
  { file: 'net/probe.ts', imports: ['../src/control/server.ts', '../src/base/log.ts'], violations: 1 },
  {
    file: 'vm/migration/probe.ts',
    imports: ['../../src/agent/run.ts', '../../fixtures/testnet/clouds.ts', '../../net/link/interfaces.ts'],
    violations: 2,
  },
  {
    file: 'src/base/probe.ts',
    imports: ['../agent/run.ts', '../../net/node.ts', './errors.ts'],
    violations: 2,
  },
  {
    file: 'src/agent/probe.ts',
    imports: ['../../test/helpers/vm.ts', '../../fixtures/testnet/clouds.ts', '../../vm/spec.ts'],
    violations: 2,
  },
  {
    file: 'src/demo/probe.ts',
    imports: ['../../fixtures/testnet/testnet.ts', '../../test/helpers/vm.ts'],
    violations: 1,
  },
  {
    file: 'fixtures/testnet/probe.ts',
    imports: ['../../test/helpers/vm.ts', '../../src/base/errors.ts'],
    violations: 1,
  },
]

describe('layering is enforced by the linter', function () {
  this.timeout(60_000)
  let dir = ''

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'mesh-layering-'))
    const config = JSON.parse(readFileSync(join(ROOT, 'biome.json'), 'utf8')) as Record<string, unknown>
    delete config.$schema
    delete config.vcs
    writeFileSync(join(dir, 'biome.json'), JSON.stringify(config))
    for (const p of PROBES) {
      const path = join(dir, p.file)
      mkdirSync(dirname(path), { recursive: true })
      const lines = p.imports.map((spec, i) => `import * as m${i} from '${spec}'`)
      lines.push(`export const all = [${p.imports.map((_, i) => `m${i}`).join(', ')}]`)
      writeFileSync(path, `${lines.join('\n')}\n`)
    }
  })

  after(() => {
    if (dir) rmSync(dir, { recursive: true, force: true })
  })

  for (const p of PROBES) {
    it(`${p.file}: ${p.violations} of ${p.imports.length} imports are flagged`, () => {
      const r = spawnSync(BIOME, ['lint', '--max-diagnostics=100', '--colors=off', p.file], {
        cwd: dir,
        encoding: 'utf8',
      })
      const out = `${r.stdout}\n${r.stderr}`
      const flagged = out.match(/lint\/style\/noRestrictedImports/g)?.length ?? 0
      assert.equal(flagged, p.violations, out)
      assert.equal(r.status, p.violations > 0 ? 1 : 0, out)
    })
  }
})
