import { Command, Option } from 'commander'
import type { CommandModule } from '../command.ts'
import { jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'
import { runEvacuation } from './evacuate.ts'
import { parseDuration } from './migrate.ts'

export const drain: CommandModule = {
  build: () =>
    new Command('drain')
      .description(
        "stop taking VMs (new ones and incoming moves) and evacuate every VM of this host; 'mesh drain --off' ends it",
      )
      .option('--off', 'take VMs again', false)
      .option('--to <peer>', 'move every VM to this member only')
      .addOption(
        new Option(
          '--deadline <duration>',
          'plan the evacuation to finish within this time (e.g. 30s)',
        ).argParser(parseDuration),
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { off: boolean; to?: string; deadline?: number; json: boolean }) => {
        if (opts.off) {
          const r = await withAgent(opts, (c) => c.call('drain', { off: true }))
          if (opts.json) return printJson(r)
          process.stdout.write('this host takes VMs again\n')
          return
        }
        await runEvacuation(
          'drain',
          {
            ...(opts.to === undefined ? {} : { to: opts.to }),
            ...(opts.deadline === undefined ? {} : { deadlineMs: opts.deadline }),
          },
          opts,
        )
      }),
}
