import { Command } from 'commander'
import type { CommandModule } from '../command.ts'
import { jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

export const revoke: CommandModule = {
  build: () =>
    new Command('revoke')
      .description('remove a member everywhere: its links close and its invite no longer admits it')
      .argument('<peer>', 'member name or PeerId')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (peer: string, opts: StateOpts & { json: boolean }) => {
        const res = await withAgent(opts, (c) => c.call('revoke', { peer }))
        if (opts.json) return printJson(res)
        process.stdout.write(`revoked ${res.name} (${res.revoked})\n`)
      }),
}
