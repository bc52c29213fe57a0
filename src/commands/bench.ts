import { Command, Option } from 'commander'
import type { CommandModule } from '../command.ts'
import { interruptSignal, jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'
import { positiveInt } from './ping.ts'

export const bench: CommandModule = {
  build: () =>
    new Command('bench')
      .description(
        'measure throughput to a member: the overlay link (its control channel) or, with --over libp2p, a plain libp2p stream',
      )
      .argument('<peer>', 'member name or PeerId (a unique prefix is enough)')
      .option('--mib <n>', 'MiB to send', positiveInt('--mib'), 64)
      .addOption(
        new Option(
          '--over <what>',
          "'link': the overlay link's control channel (WebRTC); 'libp2p': a plain libp2p stream (tcp+noise+yamux, direct when possible), the baseline",
        )
          .choices(['link', 'libp2p'])
          .default('link'),
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(
        async (peer: string, opts: StateOpts & { json: boolean; mib: number; over: 'link' | 'libp2p' }) => {
          const signal = interruptSignal()
          const res = await withAgent(opts, (c) =>
            c.call('bench', { peer, bytes: opts.mib * 1024 * 1024, over: opts.over }, { signal }),
          )
          if (opts.json) return printJson(res)
          process.stdout.write(
            `${res.peer}: ${(res.bytes / 1048576).toFixed(0)} MiB in ${res.seconds.toFixed(2)} s = ${res.mbps.toFixed(1)} MB/s (path ${res.path ?? '?'})\n`,
          )
        },
      ),
}
