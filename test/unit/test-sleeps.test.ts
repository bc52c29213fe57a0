/**
 * Tests must not sleep on a production constant (#18.6): a sleep of `HEARTBEAT_MS * 2` passes or fails
 * with the machine's load and silently changes meaning when the constant does. Wait on the outcome
 * (test/helpers/wait.ts, an event, a counter), inject the value small, or drive an injected clock.
 *
 * This scans every test source (test/, benchmarks excepted) for a sleep — `setTimeout(r, X)` inside a
 * promise, `sleep(X)`, `delay(X)` — whose duration names a value imported from src/, net/, vm/ or
 * fixtures/ (the guest's and the testnet's own timings), or a
 * local constant computed from one. Literal sleeps are out of its reach (reviewed by hand; see the
 * comments at each remaining one).
 */
import assert from 'node:assert/strict'
import { readdirSync, readFileSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'

const ROOT = resolve(import.meta.dirname, '../..')
const PRODUCTION = ['src', 'net', 'vm', 'fixtures'].map((d) => join(ROOT, d))

/** Names a file imports as values from production modules (type-only imports cannot be slept on). */
function productionImports(file: string, text: string): Set<string> {
  const names = new Set<string>()
  const re = /import\s+(?!type\s)([^'";]*?)\s+from\s+['"]([^'"]+)['"]/gs
  for (const m of text.matchAll(re)) {
    const spec = m[2]!
    if (!spec.startsWith('.')) continue
    const target = resolve(dirname(file), spec)
    if (!PRODUCTION.some((p) => target.startsWith(`${p}/`))) continue
    const clause = m[1]!
    const ns = /\*\s+as\s+(\w+)/.exec(clause)
    if (ns) names.add(ns[1]!)
    const def = /^(\w+)\s*(,|$)/.exec(clause.trim())
    if (def) names.add(def[1]!)
    const braces = /\{([^}]*)\}/s.exec(clause)
    for (const part of braces?.[1]?.split(',') ?? []) {
      const p = part.trim()
      if (p === '' || p.startsWith('type ')) continue
      const alias = /^\w+\s+as\s+(\w+)$/.exec(p)
      names.add(alias ? alias[1]! : p)
    }
  }
  return names
}

const mentions = (expr: string, names: Set<string>) =>
  [...expr.matchAll(/[A-Za-z_$][\w$]*/g)].some((w) => names.has(w[0]))

/** The call's argument text from `at` to its closing parenthesis (nested calls included). */
function argument(text: string, at: number): string {
  let depth = 0
  for (let i = at; i < text.length; i++) {
    const c = text[i]
    if (c === '(') depth++
    else if (c === ')' && depth-- === 0) return text.slice(at, i)
  }
  return text.slice(at)
}

/** `file:line: sleep(...)` for every sleep whose duration comes from a production value. */
function sleepsOnProductionConstants(file: string, text: string): string[] {
  const tainted = productionImports(file, text)
  // Local constants computed from a production value are production values too (to a fixed point).
  const consts = [...text.matchAll(/\bconst\s+(\w+)\s*(?::[^=]+)?=\s*([^\n;]+)/g)]
  for (let grew = true; grew; ) {
    grew = false
    for (const c of consts)
      if (!tainted.has(c[1]!) && mentions(c[2]!, tainted)) {
        tainted.add(c[1]!)
        grew = true
      }
  }
  const found: string[] = []
  const sleeps = /setTimeout\(\s*(?:r|res|resolve)\s*,|\b(?:sleep|delay)\(/g
  for (const m of text.matchAll(sleeps)) {
    const arg = argument(text, m.index + m[0].length)
    if (!mentions(arg, tainted)) continue
    const line = text.slice(0, m.index).split('\n').length
    found.push(`${relative(ROOT, file)}:${line}: ${m[0]}${arg})`)
  }
  return found
}

function testSources(dir: string): string[] {
  const out: string[] = []
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name)
    if (e.isDirectory()) {
      if (p !== join(ROOT, 'test', 'bench')) out.push(...testSources(p))
    } else if (e.name.endsWith('.ts') && p !== import.meta.filename) out.push(p) // its own examples
  }
  return out
}

describe('tests wait on outcomes, not on production constants (#18.6)', () => {
  it('no test sleeps on a value imported from src/, net/, vm/ or fixtures/', () => {
    const found = testSources(join(ROOT, 'test')).flatMap((f) =>
      sleepsOnProductionConstants(f, readFileSync(f, 'utf8')),
    )
    assert.deepEqual(found, [], 'wait on the outcome or inject the value instead')
  })

  it('the check bites: direct, aliased, namespaced, derived and fixture constants, not comments', () => {
    const file = join(ROOT, 'test', 'unit', 'x.test.ts')
    const src = [
      "import { HEARTBEAT_MS, DEAD_MS as DEAD, type Opts } from '../../net/webrtc/link.ts'",
      "import * as sw from '../../net/tunnel/switch.ts'",
      "import { waitUntil } from '../helpers/wait.ts'",
      "import { HELPER_MS } from '../helpers/rig.ts'",
      'const twice = DEAD * 2',
      'await new Promise((r) => setTimeout(r, HEARTBEAT_MS + 10))',
      'await sleep(twice)',
      'await delay(sw.GRACE_MS)',
      'await sleep(HELPER_MS)',
      'await sleep(50)',
      'await waitUntil("x", () => true)',
      "import { COUNTER_INTERVAL_MS } from '../../fixtures/guest/ports.ts'",
      'await sleep(Math.max(10, COUNTER_INTERVAL_MS * 3))',
      'await sleep(5) // not HEARTBEAT_MS: a comment is no duration',
    ].join('\n')
    assert.deepEqual(
      sleepsOnProductionConstants(file, src).map((l) => l.split(': ')[0]),
      ['test/unit/x.test.ts:6', 'test/unit/x.test.ts:7', 'test/unit/x.test.ts:8', 'test/unit/x.test.ts:13'],
    )
  })
})
