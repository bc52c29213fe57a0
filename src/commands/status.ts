import { Command } from 'commander'
import type { CommandModule } from '../command.ts'
import type { NetStatus } from '../control/api.ts'
import { jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

export const status: CommandModule = {
  build: () =>
    new Command('status')
      .description("show this node's agent: identity, network, members and links")
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean }) => {
        const st = await withAgent(opts, (c) => c.call('status'))
        if (opts.json) return printJson(st)
        const net: Partial<NetStatus> = st.net ?? {}
        const lines = [
          `node      ${net.name ?? '?'} (${net.peerId ?? '?'})`,
          `network   ${net.network?.name ?? '?'} ${net.network?.id ?? ''}`.trimEnd(),
          `members   ${net.members ?? 0}, links open ${net.linksOpen ?? 0}`,
          `agent     pid ${String(st.pid)}, up ${Math.round(Number(st.uptimeMs ?? 0) / 1000)} s, state ${String(st.stateDir)}`,
        ]
        if (net.listen !== undefined && net.listen.length > 0) lines.push(`listen    ${net.listen.join(' ')}`)
        process.stdout.write(`${lines.join('\n')}\n`)
      }),
}
