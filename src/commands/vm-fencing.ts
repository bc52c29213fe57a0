/**
 * `mesh vm tokens VM` and `mesh vm recover VM`: the fencing side of VMs (see vm/migration/ledger.ts).
 * Both talk to the agent's migration service: tokens asks every linked member for its history of the
 * VM; recover resumes a copy held here after its newer copy was lost, an operator's explicit decision.
 */
import { type Command, Option } from 'commander'
import { formatTable, jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

const when = (at: number) =>
  new Date(at)
    .toISOString()
    .replace('T', ' ')
    .replace(/\.\d+Z$/, 'Z')

/** Adds the fencing subcommands to `mesh vm`. */
export function addFencingCommands(cmd: Command): void {
  cmd
    .command('tokens')
    .description("a VM's fencing tokens and their history on every member (who ran it under which token)")
    .argument('<name>', 'VM name')
    .addOption(stateOption())
    .addOption(jsonOption())
    .action(async (name: string, opts: StateOpts & { json: boolean }) => {
      const r = await withAgent(opts, (c) => c.call('vm.tokens', { vm: name }))
      if (opts.json) return printJson(r)
      const rows = r.members.map((m) => [
        m.member,
        m.error === undefined ? String(m.token ?? 0) : '?',
        m.error !== undefined ? `unreachable: ${m.error}` : m.status === '' ? '-' : (m.status ?? '-'),
        m.lost === undefined ? '' : `newest copy (token ${m.lost.token}) lost`,
      ])
      const out = [formatTable(['MEMBER', 'TOKEN', 'VM HERE', 'NOTE'], rows), '']
      const names = new Map(r.members.map((m) => [m.peer, m.member]))
      for (const m of r.members) {
        if (m.events === undefined || m.events.length === 0) continue
        out.push(`${m.member}:`)
        for (const e of m.events) {
          const peer =
            e.peer === undefined
              ? ''
              : ` ${e.event === 'in' ? 'from' : e.event === 'out' ? 'to' : 'on'} ${names.get(e.peer) ?? e.peer}`
          out.push(
            `  ${when(e.at)}  token ${e.token}  ${e.event}${peer}${e.note === undefined ? '' : ` (${e.note})`}`,
          )
        }
      }
      process.stdout.write(`${out.join('\n').trimEnd()}\n`)
    })
  cmd
    .command('recover')
    .description(
      'resume the copy of a VM held on this host (paused after its newer copy was lost, or after a move that cannot be settled) under a token newer than any member has seen',
    )
    .argument('<name>', 'VM name')
    .addOption(
      new Option('--accept-loss', 'resume it although what ran in the newer copy is lost').default(false),
    )
    .addOption(stateOption())
    .addOption(jsonOption())
    .action(async (name: string, opts: StateOpts & { json: boolean; acceptLoss: boolean }) => {
      const r = await withAgent(opts, (c) => c.call('vm.recover', { vm: name, acceptLoss: opts.acceptLoss }))
      if (opts.json) return printJson(r)
      process.stdout.write(
        `recovered ${r.vm} on ${r.member} under token ${r.token}${r.resumed ? ' (resumed)' : ''}${r.lost === undefined ? '' : `; gave up the copy of token ${r.lost.token} on ${r.lost.on}`}\n`,
      )
    })
}
