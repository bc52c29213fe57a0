import { Command } from 'commander'
import type { CommandModule } from '../command.ts'
import { statePaths } from '../config.ts'
import { AgentUnavailableError, connectControl } from '../control/client.ts'
import { type AgentView, agentChecks, type Check, hostChecks, realHost } from '../ops/doctor.ts'
import { jsonOption, printJson, resolveState, type StateOpts, stateOption } from './common.ts'

/** The running agent's view for the doctor, or undefined when none runs for the state dir. */
async function agentView(state: string): Promise<AgentView | undefined> {
  let client: Awaited<ReturnType<typeof connectControl>>
  try {
    client = await connectControl(statePaths(state).controlSocket)
  } catch (err) {
    if (err instanceof AgentUnavailableError) return undefined
    throw err
  }
  try {
    const st = await client.call('status')
    const { peers } = await client.call('peers')
    const all = await client.call('vm.ls-all').catch(() => ({ members: [] }))
    return {
      listen: st.net?.listen ?? [],
      peers,
      clocks: all.members.filter((m) => !m.self),
      ...(st.metrics?.listen === undefined ? {} : { metrics: st.metrics.listen }),
      ...(st.net?.tcpCongestion === undefined ? {} : { tcpCongestion: st.net.tcpCongestion }),
      ...(st.web?.listen === undefined ? {} : { web: st.web.listen }),
    }
  } finally {
    client.close()
  }
}

const MARK: Record<Check['verdict'], string> = { ok: 'ok  ', warn: 'WARN', fail: 'FAIL' }

export const doctor: CommandModule = {
  build: () =>
    new Command('doctor')
      .description(
        'check this host for what mesh needs (QEMU, KVM or TCG, UDP buffers, userfaultfd, cgroup v2, TAP, ' +
          'ports, clock skew) and say how to fix what is missing; exit 1 when something required fails',
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean }) => {
        const state = resolveState(opts)
        const checks = [...hostChecks(realHost, state), ...agentChecks(await agentView(state))]
        const failed = checks.some((c) => c.verdict === 'fail')
        if (opts.json) printJson({ ok: !failed, checks })
        else {
          const w = Math.max(...checks.map((c) => c.name.length))
          for (const c of checks) {
            process.stdout.write(`${MARK[c.verdict]}  ${c.name.padEnd(w)}  ${c.detail}\n`)
            if (c.fix !== undefined) process.stdout.write(`      ${' '.repeat(w)}  fix: ${c.fix}\n`)
          }
        }
        if (failed) process.exitCode = 1
      }),
}
