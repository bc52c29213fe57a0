import type { CommandModule } from '../command.ts'
import { agent } from './agent.ts'
import { bench } from './bench.ts'
import { expose } from './expose.ts'
import { invite } from './invite.ts'
import { join } from './join.ts'
import { network } from './network.ts'
import { peers } from './peers.ts'
import { ping } from './ping.ts'
import { revoke } from './revoke.ts'
import { status } from './status.ts'

/**
 * Every `mesh` command, one file each. Later commands register here; the order is the order
 * `mesh --help` lists them in.
 */
export const commands: CommandModule[] = [
  network,
  agent,
  join,
  invite,
  revoke,
  status,
  peers,
  ping,
  expose,
  bench,
]
