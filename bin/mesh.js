#!/usr/bin/env node
// Entry point of the `mesh` bin: mesh is written in TypeScript and runs through tsx (no build step).
import { register } from 'tsx/esm/api'

register()
const { main } = await import('../src/cli.ts')
process.exitCode = await main(process.argv)
