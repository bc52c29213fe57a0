import { Command, InvalidArgumentError } from 'commander'
import type { CommandModule } from '../command.ts'
import { jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

/** Parses durations like 90s, 15m, 2h, 7d into ms. */
export function parseDuration(v: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(v.trim())
  if (m === null) throw new InvalidArgumentError(`'${v}' is not a duration like 30s, 15m, 2h`)
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[
    m[2] as 'ms' | 's' | 'm' | 'h' | 'd'
  ]
  const ms = Number(m[1]) * unit
  if (!(ms > 0)) throw new InvalidArgumentError('the duration must be positive')
  return ms
}

export const invite: CommandModule = {
  build: () =>
    new Command('invite')
      .description('make a signed, expiring invite (needs the agent that holds the network key)')
      .option('--ttl <duration>', 'validity, e.g. 30m, 2h, 7d', parseDuration, 3_600_000)
      .option('--bind <peer>', 'only this PeerId may use the invite')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean; ttl: number; bind?: string }) => {
        const res = await withAgent(opts, (c) =>
          c.call('invite', { ttlMs: opts.ttl, ...(opts.bind === undefined ? {} : { bind: opts.bind }) }),
        )
        if (opts.json) return printJson(res)
        process.stdout.write(`${res.invite}\n`)
      }),
}
