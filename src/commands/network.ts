import { existsSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { Command } from 'commander'
import { UsageError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { NETWORK_KEY_FILE } from '../config.ts'
import { jsonOption, printJson, resolveState, type StateOpts, stateOption } from './common.ts'

export const network: CommandModule = {
  build: () =>
    new Command('network').description('manage networks').addCommand(
      new Command('create')
        .description(
          'create a network: its key (mode 0600) lands in the state dir, whose agent becomes the first member',
        )
        .argument('<name>', 'network name (letters, digits, . _ -)')
        .addOption(stateOption())
        .addOption(jsonOption())
        .action(async (name: string, opts: StateOpts & { json: boolean }) => {
          const { createNetwork, isValidName, saveNetworkKey } = await import(
            '../../net/membership/network.ts'
          )
          if (!isValidName(name))
            throw new UsageError(`invalid network name '${name}' (letters, digits, . _ -; max 64)`)
          const dir = resolveState(opts)
          mkdirSync(dir, { recursive: true, mode: 0o700 })
          const file = join(dir, NETWORK_KEY_FILE)
          if (existsSync(file))
            throw new UsageError(`${file} already exists: this state dir already has a network`)
          const key = await createNetwork(name)
          await saveNetworkKey(file, key)
          if (opts.json) return printJson({ network: key.info.id, name, keyFile: file })
          process.stdout.write(
            `created network ${name} (${key.info.id})\nkey: ${file} (keep it secret; it signs invites and revocations)\n` +
              `next: mesh agent --bootstrap --state ${dir}   then: mesh invite --state ${dir}\n`,
          )
        }),
    ),
}
