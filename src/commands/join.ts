import { readFileSync } from 'node:fs'
import { Command } from 'commander'
import { UsageError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { type AgentCliOptions, addAgentOptions, toAgentOptions } from './agent-options.ts'

/** The invite is a credential: accept it from a file or stdin so it need not sit in argv/history. */
function readInvite(arg: string): string {
  const text =
    arg === '-' ? readFileSync(0, 'utf8') : arg.startsWith('@') ? readFileSync(arg.slice(1), 'utf8') : arg
  const invite = text.trim()
  if (!invite.startsWith('mesh1:'))
    throw new UsageError("the invite must start with 'mesh1:' (from 'mesh invite')")
  return invite
}

export const join: CommandModule = {
  build: () =>
    addAgentOptions(
      new Command('join')
        .description('join a network with an invite and run the agent in the foreground')
        .argument('<invite>', "invite from 'mesh invite'; '-' reads it from stdin, '@FILE' from a file"),
    ).action(async (inviteArg: string, opts: AgentCliOptions) => {
      const options = toAgentOptions(opts, readInvite(inviteArg))
      const { runAgent } = await import('../agent/run.ts')
      await runAgent(options)
    }),
}
