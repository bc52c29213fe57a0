/**
 * `npm run bench -- NAME [args]`: runs one benchmark. Each benchmark lives in test/bench/NAME.ts and
 * exports `main(args: string[]): Promise<Record<string, unknown>>`; it measures its own baseline in the
 * same run, prints progress on stderr, and its result is printed here as the LAST line of stdout, as JSON.
 */
import { readdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

const dir = fileURLToPath(new URL('.', import.meta.url))
const available = readdirSync(dir)
  .filter((f) => f.endsWith('.ts') && f !== 'main.ts' && !f.startsWith('_'))
  .map((f) => f.replace(/\.ts$/, ''))

const [name, ...args] = process.argv.slice(2)
if (name === undefined || !available.includes(name)) {
  process.stderr.write(`usage: npm run bench -- <${available.join('|')}> [args]\n`)
  process.exit(2)
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
