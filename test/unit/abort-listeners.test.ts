/**
 * One abort helper (#18.7): production code listens to an AbortSignal only through src/base/abort.ts
 * (`onAbort` returns the disposer, `linkedController`, `abortable`, `sleep`). A hand-rolled
 * addEventListener('abort') / removeEventListener pair is how listeners leaked on long-lived signals
 * (MaxListenersExceededWarning) and how an already-aborted signal was silently never noticed.
 *
 * Scans src/, net/ and vm/ (fixtures/ and test/ are test infrastructure, not checked here).
 */
import assert from 'node:assert/strict'
import { readdirSync, readFileSync } from 'node:fs'
import { join, relative, resolve } from 'node:path'

const ROOT = resolve(import.meta.dirname, '../..')
const SCANNED = ['src', 'net', 'vm']
const HELPER = 'src/base/abort.ts'
const HAND_ROLLED = /\b(add|remove)EventListener\(\s*['"`]abort['"`]/g

function sources(dir: string): string[] {
  const out: string[] = []
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name)
    if (e.isDirectory()) out.push(...sources(p))
    else if (/\.(ts|mts|cts|js|mjs)$/.test(e.name)) out.push(p)
  }
  return out
}

/** file:line of every hand-rolled abort listener in `text`. */
function findHandRolled(file: string, text: string): string[] {
  const found: string[] = []
  for (const m of text.matchAll(HAND_ROLLED)) {
    const line = text.slice(0, m.index).split('\n').length
    found.push(`${file}:${line}`)
  }
  return found
}

describe('one abort helper (src/base/abort.ts)', () => {
  it('the check finds a hand-rolled pair and lets onAbort pass', () => {
    const bad =
      'signal.addEventListener(\'abort\', f, { once: true })\nsignal?.removeEventListener("abort", f)\n'
    assert.deepEqual(findHandRolled('x.ts', bad), ['x.ts:1', 'x.ts:2'])
    assert.deepEqual(
      findHandRolled('x.ts', 'const off = onAbort(signal, f)\nel.addEventListener("close", g)\n'),
      [],
    )
  })

  it('no file in src/, net/ or vm/ listens to an AbortSignal by hand', () => {
    const found: string[] = []
    for (const top of SCANNED)
      for (const file of sources(join(ROOT, top))) {
        const rel = relative(ROOT, file)
        if (rel === HELPER) continue
        found.push(...findHandRolled(rel, readFileSync(file, 'utf8')))
      }
    assert.deepEqual(
      found,
      [],
      `use onAbort(signal, fn) from ${HELPER} (it returns the disposer; call it when the work ends) instead of:\n  ${found.join('\n  ')}`,
    )
  })
})
