import { Command } from 'commander'
import type { CommandModule } from '../command.ts'
import { jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

interface NetStatus {
  peerId?: string
  name?: string
  network?: { id: string; name: string }
  members?: number
  linksOpen?: number
  listen?: string[]
}

export const status: CommandModule = {
  build: () =>
    new Command('status')
      .description("show this node's agent: identity, network, members and links")
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean }) => {
        const st = (await withAgent(opts, (c) => c.call('status'))) as Record<string, unknown>
        if (opts.json) return printJson(st)
        const net = (st.net ?? {}) as NetStatus
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
