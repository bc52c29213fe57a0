import type { Command } from 'commander'

/** Options every command understands, defined once on the root program. */
export interface GlobalOptions {
  debug: boolean
}

/**
 * One CLI command. `build` returns a commander Command whose action validates its input (throwing
 * UsageError for bad input), builds the object that does the work, and waits on it.
 */
export interface CommandModule {
  build(): Command
}
