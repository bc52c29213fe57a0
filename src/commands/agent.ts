import { Command } from 'commander'
import type { CommandModule } from '../command.ts'
import { type AgentCliOptions, addAgentOptions, toAgentOptions } from './agent-options.ts'

export const agent: CommandModule = {
  build: () =>
    addAgentOptions(
      new Command('agent').description(
        "run this node's agent in the foreground (after 'mesh join' or 'mesh network create'); Ctrl-C stops it",
      ),
    ).action(async (opts: AgentCliOptions) => {
      // Loaded here: the agent's modules (libp2p, werift, QEMU driver) are for this command only.
      const { runAgent } = await import('../agent/run.ts')
      await runAgent(toAgentOptions(opts))
    }),
}
