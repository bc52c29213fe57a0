import { Command, CommanderError } from 'commander'
import { MeshError, UsageError } from './base/errors.ts'
import { commands } from './commands/index.ts'
import { VERSION } from './version.ts'

/** Builds the root program with every registered command. Exported for tests of the CLI surface. */
export function buildProgram(): Command {
  const program = new Command('mesh')
    .description('private peer-to-peer overlay across NATs, with live VM migration that keeps connections up')
    .version(VERSION, '-V, --version', 'print the version and exit')
    .option('--debug', 'print stack traces and debug logs on failure', false)
    .showSuggestionAfterError(true)
    .exitOverride()
    .configureOutput({
      // Commander writes multi-line usage on errors; main() prints a single line instead.
      writeErr: () => {},
    })
  for (const mod of commands) {
    const cmd = mod.build()
    cmd.exitOverride()
    cmd.configureOutput({ writeErr: () => {} })
    program.addCommand(cmd)
  }
  return program
}

/**
 * Runs the CLI and returns the exit status: 0 on success, 2 on a usage error (one line on stderr),
 * 1 on a runtime failure (one actionable line; the stack only with --debug).
 */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram()
  const debug = argv.includes('--debug') || process.env.MESH_DEBUG === '1'
  try {
    await program.parseAsync(argv)
    return 0
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help and --version end through exitOverride with exit code 0.
      if (err.exitCode === 0) return 0
      if (err.code === 'commander.help' || err.code === 'commander.helpDisplayed') return 0
      const line = err.message.replace(/^error: /, '').split('\n')[0]
      process.stderr.write(`mesh: ${line} (see 'mesh --help')\n`)
      return 2
    }
    if (err instanceof UsageError) {
      process.stderr.write(`mesh: ${err.message}\n`)
      return 2
    }
    const message = err instanceof Error ? err.message : String(err)
    process.stderr.write(`mesh: ${message}\n`)
    if (debug && err instanceof Error) {
      process.stderr.write(`${err.stack ?? ''}\n`)
      let cause: unknown = err.cause
      while (cause instanceof Error) {
        process.stderr.write(`caused by: ${cause.stack ?? cause.message}\n`)
        cause = cause.cause
      }
    } else if (!(err instanceof MeshError)) {
      process.stderr.write('mesh: (unexpected error; run with --debug for details)\n')
    }
    return err instanceof MeshError ? err.exitCode : 1
  }
}
