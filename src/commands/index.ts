import type { CommandModule } from '../command.ts'
import { bench } from './bench.ts'
import { peers } from './peers.ts'
import { ping } from './ping.ts'
import { status } from './status.ts'

/**
 * Every `mesh` command, one file each. Later commands register here; the order is the order
 * `mesh --help` lists them in.
 */
export const commands: CommandModule[] = [status, peers, ping, bench]
