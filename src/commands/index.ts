import type { CommandModule } from '../command.ts'
import { agent } from './agent.ts'
import { bench } from './bench.ts'
import { doctor } from './doctor.ts'
import { drain } from './drain.ts'
import { evacuate } from './evacuate.ts'
import { expose } from './expose.ts'
import { image } from './image.ts'
import { invite } from './invite.ts'
import { join } from './join.ts'
import { migrate } from './migrate.ts'
import { network } from './network.ts'
import { peers } from './peers.ts'
import { ping } from './ping.ts'
import { revoke } from './revoke.ts'
import { service } from './service.ts'
import { status } from './status.ts'
import { vm } from './vm.ts'
import { web } from './web.ts'

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
  vm,
  image,
  migrate,
  web,
  service,
  doctor,
  evacuate,
  drain,
]
