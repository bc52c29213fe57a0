import { Command } from 'commander'
import type { CommandModule } from '../command.ts'
import { formatTable, jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

export const peers: CommandModule = {
  build: () =>
    new Command('peers')
      .description('list the members of the network with their link state, path type and RTT')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean }) => {
        const res = await withAgent(opts, (c) => c.call('peers'))
        if (opts.json) return printJson(res)
        const rows = res.peers.map((p) => [
          p.name,
          p.id,
          p.state,
          p.link,
          p.direct === undefined ? (p.path ?? '-') : `${p.path ?? '-'}+${p.bulk ?? 'tcp'}`,
          p.rttMs === undefined ? '-' : `${p.rttMs.toFixed(1)} ms`,
        ])
        process.stdout.write(`${formatTable(['NAME', 'PEER', 'STATE', 'LINK', 'PATH', 'RTT'], rows)}\n`)
      }),
}
