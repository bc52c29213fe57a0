import { Command, Option } from 'commander'
import type { VmControl, VmInfo } from '../../vm/manager.ts'
import { MeshError, UsageError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { statePaths } from '../config.ts'
import { AgentUnavailableError, type ControlClient, connectControl, RemoteError } from '../control/client.ts'
import {
  formatTable,
  jsonOption,
  printJson,
  resolveState,
  type StateOpts,
  stateOption,
  withAgent,
} from './common.ts'

/** VmControl through the agent's control API. */
function remoteControl(client: ControlClient): VmControl {
  return {
    run: async (spec) => (await client.call('vm.run', { spec })) as VmInfo,
    list: async () => ((await client.call('vm.ls')) as { vms: VmInfo[] }).vms,
    stop: async (name) => (await client.call('vm.stop', { name })) as VmInfo,
    console: async (name, lines) =>
      ((await client.call('vm.console', { name, lines })) as { lines: string[] }).lines,
    close: async () => client.close(),
  }
}

/**
 * The agent's VM service when an agent runs for this state dir; otherwise (no agent, or one without
 * the VM service) a VmManager in this process working on the same state dir. VMs started that way
 * outlive the command and are re-adopted by the next command or agent.
 */
export async function openVmControl(opts: StateOpts): Promise<VmControl> {
  const dir = resolveState(opts)
  let client: ControlClient | undefined
  try {
    client = await connectControl(statePaths(dir).controlSocket)
    await client.call('vm.ls')
    return remoteControl(client)
  } catch (err) {
    client?.close()
    const noVmService = err instanceof RemoteError && err.code === 'E_UNKNOWN_METHOD'
    if (!(err instanceof AgentUnavailableError) && !noVmService) throw err
  }
  const { createLocalVmManager } = await import('../agent/services/vm.ts')
  const manager = createLocalVmManager(dir)
  await manager.init()
  return manager
}

/** A VM that runs on another member: say which, so the operator knows where to act. */
export class VmElsewhereError extends MeshError {
  constructor(vm: string, member: string, peer: string) {
    super(`VM '${vm}' runs on member ${member} (${peer}), not here: run the command there`, {
      code: 'E_VM_ELSEWHERE',
    })
  }
}

async function withVms<T>(opts: StateOpts, fn: (c: VmControl) => Promise<T>, vm?: string): Promise<T> {
  const c = await openVmControl(opts)
  try {
    return await fn(c)
  } catch (err) {
    // Not on this host: ask the mesh where it runs (an agent with the directory service answers).
    if (vm === undefined || !(err instanceof RemoteError || err instanceof MeshError)) throw err
    if ((err as MeshError).code !== 'E_VM_NOT_FOUND') throw err
    const where = await withAgent(opts, (a) => a.call('vm.where', { vm })).catch(() => undefined)
    const w = where as { here?: boolean; member?: string; peer?: string } | undefined
    if (w === undefined || w.here === true || w.member === undefined) throw err
    throw new VmElsewhereError(vm, w.member, w.peer ?? '?')
  } finally {
    await c.close()
  }
}

interface MemberVms {
  peer: string
  member: string
  self: boolean
  vms: Array<{ name: string; status: string; ip?: string; mac?: string; memoryMiB?: number; vcpus?: number }>
  error?: string
}

function row(v: VmInfo): string[] {
  const status =
    v.status === 'exited' && v.exit !== undefined
      ? `exited(${v.exit.signal ?? v.exit.code ?? '?'})`
      : v.status
  return [v.name, status, String(v.pid ?? '-'), `${v.memoryMiB}M`, String(v.vcpus), v.mac, v.ip ?? '-']
}

const HEADER = ['NAME', 'STATUS', 'PID', 'MEM', 'CPUS', 'MAC', 'IP']

export const vm: CommandModule = {
  build() {
    const cmd = new Command('vm').description('run and manage VMs on this host')
    cmd
      .command('run')
      .description('start a VM from a spec file (JSON)')
      .argument('<spec>', 'VM spec file')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (specPath: string, opts: StateOpts & { json: boolean }) => {
        const { loadVmSpecFile } = await import('../../vm/spec.ts')
        const spec = await loadVmSpecFile(specPath).catch((err: Error) => {
          throw new UsageError(err.message, { cause: err })
        })
        const info = await withVms(opts, (c) => c.run(spec))
        if (opts.json) return printJson(info)
        process.stdout.write(`${formatTable(HEADER, [row(info)])}\n`)
      })
    cmd
      .command('ls')
      .description('list the VMs on this host (--all: on every member, asked now)')
      .option('--all', 'every member’s VMs, through the running agent', false)
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean; all: boolean }) => {
        if (opts.all) {
          const res = (await withAgent(opts, (c) => c.call('vm.ls-all'))) as { members: MemberVms[] }
          if (opts.json) return printJson(res)
          const rows = res.members.flatMap((m) =>
            m.error !== undefined
              ? [['?', `(no answer: ${m.error})`, '', '', '', m.member]]
              : m.vms.map((v) => [
                  v.name,
                  v.status,
                  `${v.memoryMiB ?? '?'}M`,
                  v.mac ?? '-',
                  v.ip ?? '-',
                  m.self ? `${m.member} (here)` : m.member,
                ]),
          )
          process.stdout.write(`${formatTable(['NAME', 'STATUS', 'MEM', 'MAC', 'IP', 'MEMBER'], rows)}\n`)
          return
        }
        const vms = await withVms(opts, (c) => c.list())
        if (opts.json) return printJson({ vms })
        process.stdout.write(`${formatTable(HEADER, vms.map(row))}\n`)
      })
    cmd
      .command('stop')
      .description('stop a VM (its RAM file and sockets are removed)')
      .argument('<name>', 'VM name')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (name: string, opts: StateOpts & { json: boolean }) => {
        const info = await withVms(opts, (c) => c.stop(name), name)
        if (opts.json) return printJson(info)
        process.stdout.write(`${name} ${info.status}\n`)
      })
    cmd
      .command('console')
      .description("print the last lines of a VM's serial console")
      .argument('<name>', 'VM name')
      .addOption(new Option('-n, --lines <n>', 'how many lines').default('50'))
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (name: string, opts: StateOpts & { json: boolean; lines: string }) => {
        const n = Number(opts.lines)
        if (!Number.isInteger(n) || n < 1)
          throw new UsageError(`--lines must be a positive integer, got '${opts.lines}'`)
        const lines = await withVms(opts, (c) => c.console(name, n), name)
        if (opts.json) return printJson({ name, lines })
        process.stdout.write(lines.length > 0 ? `${lines.join('\n')}\n` : '')
      })
    return cmd
  },
}
