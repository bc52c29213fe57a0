import { spawnSync } from 'node:child_process'
import { accessSync, constants, existsSync } from 'node:fs'

/** What a test suite needs from the machine. */
export interface Needs {
  root?: boolean
  commands?: string[]
  kvm?: boolean
}

/** Returns the reasons the machine cannot run a suite with these needs (empty when it can). */
export function missing(needs: Needs): string[] {
  const reasons: string[] = []
  if (needs.root === true && process.getuid?.() !== 0) reasons.push('needs root (network namespaces, NAT)')
  for (const cmd of needs.commands ?? []) {
    if (!hasCommand(cmd)) reasons.push(`needs the '${cmd}' command (run: npm run setup, as root)`)
  }
  if (needs.kvm === true) {
    try {
      accessSync('/dev/kvm', constants.R_OK | constants.W_OK)
    } catch {
      reasons.push('needs /dev/kvm')
    }
  }
  return reasons
}

const commandCache = new Map<string, boolean>()
export function hasCommand(cmd: string): boolean {
  let ok = commandCache.get(cmd)
  if (ok === undefined) {
    ok = cmd.startsWith('/')
      ? existsSync(cmd)
      : spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0
    commandCache.set(cmd, ok)
  }
  return ok
}

/**
 * Call in a suite's `before` hook. When the machine lacks something the suite needs, prints why and
 * skips the suite (counted as skipped). In CI (CI=true) a missing prerequisite fails instead: CI is root
 * with everything installed, so a skip there would hide a broken setup.
 */
export function requireOrSkip(ctx: Mocha.Context, needs: Needs): void {
  const reasons = missing(needs)
  if (reasons.length === 0) return
  const title = ctx.test?.parent?.fullTitle() ?? 'suite'
  if (process.env.CI === 'true' || process.env.MESH_REQUIRE_ALL === '1') {
    throw new Error(`${title}: prerequisites missing in CI: ${reasons.join('; ')}`)
  }
  process.stdout.write(`  [skip] ${title}: ${reasons.join('; ')}\n`)
  ctx.skip()
}
