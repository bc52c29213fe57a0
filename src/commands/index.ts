import type { CommandModule } from '../command.ts'

/**
 * Every `mesh` command, one file each. Later commands register here; the order is the order
 * `mesh --help` lists them in.
 */
export const commands: CommandModule[] = []
