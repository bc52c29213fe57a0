import { Command, InvalidArgumentError } from 'commander'
import type { CommandModule } from '../command.ts'
import { interruptSignal, jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

export function positiveInt(name: string) {
  return (v: string): number => {
    const n = Number(v)
    if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError(`${name} must be a positive integer`)
    return n
  }
}

export const ping: CommandModule = {
  build: () =>
    new Command('ping')
      .description("measure round-trip time to a member over the overlay's data channel")
      .argument('<peer>', 'member name or PeerId (a unique prefix is enough)')
      .option('-c, --count <n>', 'number of pings', positiveInt('--count'), 4)
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (peer: string, opts: StateOpts & { json: boolean; count: number }) => {
        const signal = interruptSignal()
        const res = await withAgent(opts, (c) =>
          c.call(
            'ping',
            { peer, count: opts.count },
            {
              signal,
              onEvent: (ev) => {
                if (!opts.json)
                  process.stdout.write(`seq=${ev.seq} rtt=${ev.rttMs.toFixed(2)} ms path=${ev.path ?? '?'}\n`)
              },
            },
          ),
        )
        if (opts.json) return printJson(res)
        const s = [...res.rttMs].sort((a, b) => a - b)
        const med = s[Math.floor(s.length / 2)] ?? Number.NaN
        process.stdout.write(
          `${res.peer}: ${s.length} replies, min ${s[0]?.toFixed(2)} / median ${med.toFixed(2)} / max ${s.at(-1)?.toFixed(2)} ms\n`,
        )
      }),
}
