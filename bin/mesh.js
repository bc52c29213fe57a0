#!/usr/bin/env node
// Entry point of the `mesh` bin. It runs the compiled bundle in dist/ (built by scripts/build.mjs at
// `npm ci` / `npm pack`). In a source checkout (scripts/ is there; an installed package has only dist/)
// it first checks that no source changed since that build and rebuilds if one did, so tests and
// developers always run exactly what users run and dist/ can never be silently stale.
import { existsSync } from 'node:fs'

const build = new URL('../scripts/build.mjs', import.meta.url)
if (existsSync(build)) {
  const { staleReason, build: rebuild } = await import(build.href)
  const why = staleReason()
  if (why !== undefined) {
    if (process.env.MESH_DEBUG === '1') process.stderr.write(`mesh: rebuilding dist/ (${why})\n`)
    try {
      await rebuild({ quiet: true })
    } catch (err) {
      // Usually a dependency added to package.json that this checkout has not installed yet.
      process.stderr.write(
        `mesh: cannot rebuild dist/ (${why}): ${err.message.split('\n')[0]}\nmesh: run 'npm ci' in this checkout\n`,
      )
      process.exit(1)
    }
  }
}
await import('../dist/main.js')
