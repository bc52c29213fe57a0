import { Command } from 'commander'
import { MeshError, UsageError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { formatTable, jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

export class ExposeNotFoundError extends MeshError {
  constructor(listen: string) {
    super(`nothing is exposed on ${listen} (see 'mesh expose ls')`, { code: 'E_EXPOSE_NOT_FOUND' })
  }
}

/** `VM:PORT` → { vm, port }; VM is a name or the guest's IPv4 address. */
export function parseTarget(s: string): { vm: string; port: number } {
  const i = s.lastIndexOf(':')
  const vm = i < 0 ? '' : s.slice(0, i)
  const port = Number(s.slice(i + 1))
  if (vm === '' || !Number.isInteger(port) || port < 1 || port > 65535)
    throw new UsageError(`expected VM:PORT (e.g. web:80), got '${s}'`)
  return { vm, port }
}

function checkListen(s: string): string {
  const i = s.lastIndexOf(':')
  const port = Number(s.slice(i + 1))
  if (i <= 0 || !Number.isInteger(port) || port < 0 || port > 65535)
    throw new UsageError(`--listen expects ADDR:PORT (e.g. 0.0.0.0:8080), got '${s}'`)
  return s
}

export const expose: CommandModule = {
  build() {
    const cmd = new Command('expose')
      .description(
        "accept TCP connections on this member and carry them to a guest's port through the overlay; the " +
          'guest may run on any member and keeps its exposure when it moves (needs this agent started ' +
          'with a host TAP port: --tap NAME --address CIDR)',
      )
      .argument('<vm:port>', 'guest (VM name, found on any member, or its IP) and TCP port')
      .option('--listen <addr:port>', 'address to accept connections on, e.g. 0.0.0.0:8080 (required)')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (target: string, opts: StateOpts & { json: boolean; listen?: string }) => {
        const { vm, port } = parseTarget(target)
        if (opts.listen === undefined) throw new UsageError('expose needs --listen ADDR:PORT')
        const listen = checkListen(opts.listen)
        const res = await withAgent(opts, (c) => c.call('expose', { vm, port, listen }))
        if (opts.json) return printJson(res)
        process.stdout.write(`exposing ${vm} (${res.target}:${res.port}) on ${res.listen}\n`)
      })
    cmd
      .command('ls')
      .description("list this member's exposures with their open and total connections")
      // --state and --json belong to 'expose' (commander reads a parent's options after a subcommand too).
      .action(async (_o: unknown, sub: Command) => {
        const opts = sub.optsWithGlobals<StateOpts & { json: boolean }>()
        const rows = await withAgent(opts, (c) => c.call('expose.list'))
        if (opts.json) return printJson({ exposures: rows })
        process.stdout.write(
          `${formatTable(
            ['LISTEN', 'VM', 'TARGET', 'OPEN', 'TOTAL'],
            rows.map((r) => [
              r.listen,
              r.vm,
              `${r.target}:${r.port}`,
              String(r.connections),
              String(r.total),
            ]),
          )}\n`,
        )
      })
    cmd
      .command('rm')
      .description('stop an exposure (its open connections are closed)')
      .argument('<addr:port>', "the exposure's listen address, as 'mesh expose ls' shows it")
      .action(async (listen: string, _o: unknown, sub: Command) => {
        const opts = sub.optsWithGlobals<StateOpts & { json: boolean }>()
        const res = await withAgent(opts, (c) => c.call('unexpose', { listen: checkListen(listen) }))
        if (!res.removed) throw new ExposeNotFoundError(listen)
        if (opts.json) return printJson({ removed: listen })
        process.stdout.write(`removed ${listen}\n`)
      })
    return cmd
  },
}
