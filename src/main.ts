/** The process entry of `mesh` (bundled into dist/main.js by scripts/build.mjs; bin/mesh.js runs it). */
import { main } from './cli.ts'

process.exitCode = await main(process.argv)
