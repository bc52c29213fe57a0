import { Command } from 'commander'
import { UsageError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

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
  build: () =>
    new Command('expose')
      .description(
        "accept TCP connections on this member and carry them to a guest's port through the overlay " +
          '(needs the agent started with a host TAP port)',
      )
      .argument('<vm:port>', 'guest (VM name or its IP) and TCP port')
      .requiredOption('--listen <addr:port>', 'address to accept connections on, e.g. 0.0.0.0:8080')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (target: string, opts: StateOpts & { json: boolean; listen: string }) => {
        const { vm, port } = parseTarget(target)
        const listen = checkListen(opts.listen)
        const res = (await withAgent(opts, (c) => c.call('expose', { vm, port, listen }))) as {
          listen: string
          target: string
          port: number
        }
        if (opts.json) return printJson(res)
        process.stdout.write(`exposing ${vm} (${res.target}:${res.port}) on ${res.listen}\n`)
      }),
}
