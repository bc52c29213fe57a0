// Builds dist/: the `mesh` CLI and agent as ESM bundles (esbuild), split so that `mesh --help` and the
// client commands parse only what they use, while the agent's modules (libp2p, werift...) load on demand.
// werift is bundled from node_modules after patch-package ran (npm runs `postinstall` before `prepare`),
// so an installed tarball carries the patched werift without running any install script.
// Run by `npm ci`/`npm pack` (the `prepare` script) and by bin/mesh.js when a source is newer than dist/.
import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { dirname, join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'

export const ROOT = fileURLToPath(new URL('..', import.meta.url))
export const DIST = join(ROOT, 'dist')
export const INFO_FILE = join(DIST, 'build-info.json')
/** Native modules: their binaries sit next to them (platform packages), never inside a bundle. */
export const EXTERNAL = ['node-datachannel', 'koffi']
/** Inputs outside the repository's own sources that change what the bundle holds. */
const EXTRA_INPUTS = ['package.json', 'package-lock.json', 'scripts/build.mjs']

function stamp(path, root = ROOT) {
  const s = statSync(join(root, path))
  return [path, Math.round(s.mtimeMs), s.size]
}

function patchInputs(root = ROOT) {
  try {
    return readdirSync(join(root, 'patches')).map((f) => `patches/${f}`)
  } catch {
    return []
  }
}

/**
 * Why dist/ is out of date, or undefined when it is fresh: every repository file the last build read
 * (node_modules aside: they change only with package-lock.json or patches/) must have the size and
 * mtime it had then. A new file matters only once some existing file imports it, and that one changed.
 */
export function staleReason(root = ROOT) {
  let info
  try {
    info = JSON.parse(readFileSync(join(root, 'dist', 'build-info.json'), 'utf8'))
  } catch {
    return 'dist/ has not been built'
  }
  const patches = patchInputs(root)
  const known = new Set(info.inputs.map((i) => i[0]))
  for (const p of patches) if (!known.has(p)) return `${p} is new`
  for (const [path, mtime, size] of info.inputs) {
    let now
    try {
      now = stamp(path, root)
    } catch {
      return `${path} is gone`
    }
    if (now[1] !== mtime || now[2] !== size) return `${path} changed`
  }
  return undefined
}

/** Writes a file so that a concurrent reader sees the old or the new content, never a mix. */
function writeAtomic(path, data) {
  mkdirSync(dirname(path), { recursive: true })
  const tmp = `${path}.${process.pid}.tmp`
  writeFileSync(tmp, data)
  renameSync(tmp, path)
}

export async function build({ quiet = false } = {}) {
  const { build: esbuild } = await import('esbuild')
  const t0 = performance.now()
  const result = await esbuild({
    absWorkingDir: ROOT,
    entryPoints: { main: 'src/main.ts' },
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node20',
    outdir: DIST,
    // Chunks are named by content: a build never overwrites a chunk that a running process may still load.
    chunkNames: 'chunk-[hash]',
    external: EXTERNAL,
    write: false,
    metafile: true,
    sourcemap: 'linked',
    sourcesContent: false,
    legalComments: 'none',
    // The agent keeps every bundle's source text in its heap: minified, it takes half the room. Names
    // stay readable in stack traces; --enable-source-maps maps them back to the sources.
    minifyWhitespace: true,
    minifySyntax: true,
    keepNames: true,
    logLevel: quiet ? 'error' : 'warning',
    // CommonJS dependencies call require() for Node built-ins; ESM output has none of its own.
    banner: {
      js: "import { createRequire as __meshRequire } from 'node:module';const require = __meshRequire(import.meta.url);",
    },
  })
  const outputs = new Set()
  // Entry last: it names the chunks, which must be in place before it.
  const files = [...result.outputFiles].sort(
    (a, b) => Number(a.path.endsWith('main.js')) - Number(b.path.endsWith('main.js')),
  )
  for (const f of files) {
    writeAtomic(f.path, f.contents)
    outputs.add(relative(DIST, f.path))
  }
  const inputs = Object.keys(result.metafile.inputs)
    .filter((p) => !p.startsWith('node_modules/') && !p.includes('/node_modules/'))
    .concat(EXTRA_INPUTS, patchInputs())
    .map((p) => stamp(p))
  writeAtomic(INFO_FILE, `${JSON.stringify({ inputs, outputs: [...outputs] })}\n`)
  // Chunks of earlier builds: removed once no process can still be starting from them, at once when
  // npm runs the build (`npm ci`, `npm pack`: a tarball must hold this build's files only).
  const grace = process.env.npm_lifecycle_event === 'prepare' ? 0 : 10 * 60_000
  for (const f of readdirSync(DIST)) {
    if (outputs.has(f) || f === 'build-info.json') continue
    const p = join(DIST, f)
    if (Date.now() - statSync(p).mtimeMs >= grace) rmSync(p, { force: true })
  }
  if (!quiet) {
    const bytes = [...result.outputFiles]
      .filter((f) => f.path.endsWith('.js'))
      .reduce((n, f) => n + f.contents.length, 0)
    process.stderr.write(
      `mesh build: ${outputs.size} files, ${(bytes / 2 ** 20).toFixed(1)} MiB of JS in ${Math.round(performance.now() - t0)} ms\n`,
    )
  }
  return result
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  if (process.argv.includes('--check')) {
    const why = staleReason()
    if (why !== undefined) {
      process.stderr.write(`mesh build: dist/ is stale (${why}); run 'npm run build'\n`)
      process.exit(1)
    }
  } else await build()
}
