/**
 * `npm run bench -- NAME [args]`: runs one benchmark. Each benchmark lives in test/bench/NAME.ts and
 * exports `main(args: string[]): Promise<Record<string, unknown>>`; it measures its own baseline in the
 * same run, prints progress on stderr, and its result is printed here as the LAST line of stdout, as JSON.
 *
 * `--profile P` (lan, region, crosscloud, intercontinental) puts every NAT'd-clouds topology a benchmark
 * builds on that WAN profile (it sets MESH_TEST_PROFILE, which the testnet fixture honours); `wan` takes
 * the option itself (a list of profiles).
 */
import { readdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { resolveProfile } from '../../fixtures/wan/profiles.ts'

const dir = fileURLToPath(new URL('.', import.meta.url))
const available = readdirSync(dir)
  .filter((f) => f.endsWith('.ts') && f !== 'main.ts' && !f.startsWith('_'))
  .map((f) => f.replace(/\.ts$/, ''))

const [name, ...rest] = process.argv.slice(2)
if (name === undefined || !available.includes(name)) {
  process.stderr.write(`usage: npm run bench -- <${available.join('|')}> [--profile P] [args]\n`)
  process.exit(2)
}
const args = [...rest]
const p = args.indexOf('--profile')
if (name !== 'wan' && p >= 0) {
  const profile = args[p + 1] ?? ''
  try {
    resolveProfile(profile)
  } catch (err) {
    process.stderr.write(`bench ${name}: ${(err as Error).message}\n`)
    process.exit(2)
  }
  process.env.MESH_TEST_PROFILE = profile
  args.splice(p, 2)
}
const mod = (await import(`./${name}.ts`)) as { main?: (args: string[]) => Promise<Record<string, unknown>> }
if (typeof mod.main !== 'function') {
  process.stderr.write(`bench ${name}: test/bench/${name}.ts exports no main()\n`)
  process.exit(2)
}
try {
  const result = await mod.main(args)
  process.stdout.write(`${JSON.stringify({ bench: name, ...result })}\n`)
  process.exit(0)
} catch (err) {
  process.stderr.write(
    `bench ${name} failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`,
  )
  process.exit(1)
}
