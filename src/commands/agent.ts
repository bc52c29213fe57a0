import { Command } from 'commander'
import { runAgent } from '../agent/run.ts'
import type { CommandModule } from '../command.ts'
import { type AgentCliOptions, addAgentOptions, toAgentOptions } from './agent-options.ts'

export const agent: CommandModule = {
  build: () =>
    addAgentOptions(
      new Command('agent').description(
        "run this node's agent in the foreground (after 'mesh join' or 'mesh network create'); Ctrl-C stops it",
      ),
    ).action(async (opts: AgentCliOptions) => {
      await runAgent(toAgentOptions(opts))
    }),
}
