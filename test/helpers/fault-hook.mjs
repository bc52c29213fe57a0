/**
 * Fault injection for test agents (plain JS, no loader: preloaded with NODE_OPTIONS=--import=<this
 * file>). It installs the hook that vm/migration/fault-points.ts calls at every named point of a move,
 * and acts when the test armed it: the test writes `<state dir>/test-fault.json`
 *   { "at": "destination:resumed", "action": "kill" | "stop", "vm": "g1" (optional) }
 * and the first matching point removes the file, notes `<state dir>/test-fault.fired` (the point and
 * the time), and SIGKILLs this process ('kill') or SIGSTOPs it ('stop': the test kills it later).
 * Production agents never load this file.
 */
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'

const i = process.argv.indexOf('--state')
const stateDir = i >= 0 ? process.argv[i + 1] : undefined
// Only agents: the CLI commands share the environment but never reach a migration fault point.
if (stateDir !== undefined && (process.argv.includes('agent') || process.argv.includes('join'))) {
  const armed = join(stateDir, 'test-fault.json')
  globalThis[Symbol.for('mesh.migration.faultHook')] = (point, detail) => {
    if (!existsSync(armed)) return
    let fault
    try {
      fault = JSON.parse(readFileSync(armed, 'utf8'))
    } catch {
      return
    }
    if (fault.at !== point || (fault.vm !== undefined && fault.vm !== detail.vm)) return
    rmSync(armed, { force: true })
    writeFileSync(join(stateDir, 'test-fault.fired'), `${point} ${Date.now()}\n`)
    process.kill(process.pid, fault.action === 'stop' ? 'SIGSTOP' : 'SIGKILL')
  }
}
