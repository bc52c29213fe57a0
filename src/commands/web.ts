import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Command } from 'commander'
import { MeshError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { jsonOption, printJson, resolveState, type StateOpts, stateOption, withAgent } from './common.ts'

export class WebViewOffError extends MeshError {
  constructor() {
    super("this agent serves no web view: start it with 'mesh agent --web' (or web in its config)", {
      code: 'E_WEB_OFF',
    })
  }
}

export const web: CommandModule = {
  build: () =>
    new Command('web')
      .description(
        "print the URL that logs a browser into this agent's live web view (the URL holds its token)",
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean }) => {
        const st = await withAgent(opts, (c) => c.call('status'))
        const listen = st.web?.listen
        if (listen === undefined) throw new WebViewOffError()
        // Only the agent's owner can read it (mode 0600), like the control socket.
        const token = readFileSync(join(resolveState(opts), 'web.token'), 'utf8').trim()
        const url = `http://${listen}/login?token=${token}`
        if (opts.json) return printJson({ url, listen })
        process.stdout.write(`${url}\n`)
      }),
}
