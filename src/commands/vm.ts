import { Command, InvalidArgumentError, Option } from 'commander'
import type { VmControl, VmInfo } from '../../vm/manager.ts'
import type { RemoteVmResult } from '../agent/services/directory.ts'
import { MeshError, UsageError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { statePaths } from '../config.ts'
import type { ControlParams, SpotVms } from '../control/api.ts'
import { AgentUnavailableError, type ControlClient, connectControl, RemoteError } from '../control/client.ts'
import { formatBytes } from '../progress.ts'
import {
  formatTable,
  jsonOption,
  printJson,
  resolveState,
  type StateOpts,
  stateOption,
  withAgent,
} from './common.ts'
import { addFencingCommands } from './vm-fencing.ts'

/** VmControl through the agent's control API. */
function remoteControl(client: ControlClient): VmControl {
  return {
    run: async (spec) => client.call('vm.run', { spec }),
    list: async () => (await client.call('vm.ls')).vms,
    stop: async (name) => client.call('vm.stop', { name }),
    console: async (name, lines) => (await client.call('vm.console', { name, lines })).lines,
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

/** Runs fn on this host's VMs (through the agent, or a local manager when none runs). */
async function withVms<T>(opts: StateOpts, fn: (c: VmControl) => Promise<T>): Promise<T> {
  const c = await openVmControl(opts)
  try {
    return await fn(c)
  } finally {
    await c.close()
  }
}

const notHere = (err: unknown) =>
  (err instanceof RemoteError || err instanceof MeshError) && (err as MeshError).code === 'E_VM_NOT_FOUND'

/**
 * Acts on a VM by name wherever it runs: here when this host has it, else (through the running agent)
 * on the member that runs it now. Without an agent only this host's VMs can be named.
 */
async function onVmHost<T>(
  opts: StateOpts,
  here: (c: VmControl) => Promise<T>,
  elsewhere: (a: ControlClient) => Promise<RemoteVmResult>,
): Promise<{ result?: T; remote?: RemoteVmResult }> {
  try {
    return { result: await withVms(opts, here) }
  } catch (err) {
    if (!notHere(err)) throw err
    const remote = await withAgent(opts, elsewhere).catch((e: unknown) => {
      // No agent (or an older one): the local answer stands.
      if (e instanceof AgentUnavailableError || (e instanceof RemoteError && e.code === 'E_UNKNOWN_METHOD'))
        throw err
      throw e
    })
    return { remote }
  }
}

function row(v: VmInfo): string[] {
  const status =
    v.status === 'exited' && v.exit !== undefined
      ? `exited(${v.exit.signal ?? v.exit.code ?? '?'})`
      : v.status
  return [v.name, status, String(v.pid ?? '-'), `${v.memoryMiB}M`, String(v.vcpus), v.mac, v.ip ?? '-']
}

const HEADER = ['NAME', 'STATUS', 'PID', 'MEM', 'CPUS', 'MAC', 'IP']

async function spotVms(opts: StateOpts): Promise<SpotVms | undefined> {
  let client: ControlClient | undefined
  try {
    client = await connectControl(statePaths(resolveState(opts)).controlSocket)
    return await client.call('spot.vms')
  } catch (err) {
    if (
      err instanceof AgentUnavailableError ||
      (err instanceof RemoteError && err.code === 'E_UNKNOWN_METHOD')
    )
      return undefined
    throw err
  } finally {
    client?.close()
  }
}

function standbyCell(name: string, s: SpotVms): string {
  const want = s.vms[name]?.standby
  if (want === undefined) return '-'
  const st = s.standbys[name]
  if (st === undefined) return `${want} (starting)`
  const who = st.peerName ?? want
  if (st.state === 'failed') return `${who} failed: ${st.error ?? '?'}`
  if (st.lagMs === undefined) return `${who} ${st.state}`
  return `${who} lag ${formatBytes(st.lagBytes ?? 0)} ${(st.lagMs / 1000).toFixed(1)}s`
}

function parsePriority(v: string): number {
  const n = Number(v)
  if (!Number.isInteger(n) || n < -1000 || n > 1000)
    throw new InvalidArgumentError('--priority must be a whole number from -1000 to 1000')
  return n
}

/** `16M`, `1.5G`, `800K` per second → bytes per second. */
function parseRate(v: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMG])?(?:i?B)?(?:\/s)?$/i.exec(v.trim())
  if (m === null) throw new InvalidArgumentError('--standby-rate must look like 16M (bytes per second)')
  const mult = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30 }[(m[2] ?? '').toUpperCase()] ?? 1
  const n = Math.round(Number(m[1]) * mult)
  if (n < 64 * 1024) throw new InvalidArgumentError('--standby-rate must be at least 64K')
  return n
}

type SpotOpts = StateOpts & { json: boolean; standby?: string; standbyRate?: number; priority?: number }

function spotMeta(opts: SpotOpts): ControlParams<'spot.set'>['meta'] {
  return {
    ...(opts.standby === undefined ? {} : { standby: opts.standby }),
    ...(opts.standbyRate === undefined ? {} : { standbyRateBps: opts.standbyRate }),
    ...(opts.priority === undefined ? {} : { priority: opts.priority }),
  }
}

export const vm: CommandModule = {
  build() {
    const cmd = new Command('vm').description('run and manage VMs on this host')
    cmd
      .command('run')
      .description('start a VM from a spec file (JSON)')
      .argument('<spec>', 'VM spec file')
      .option(
        '--standby <peer>',
        "keep a warm standby of its RAM on a member ('auto': the member an evacuation would pick), so an evacuation sends only what changed",
      )
      .addOption(
        new Option(
          '--standby-rate <rate>',
          'bandwidth the standby sync may use, bytes/s (default 16M)',
        ).argParser(parseRate),
      )
      .addOption(
        new Option('--priority <n>', 'evacuations move higher priorities first (default 0)').argParser(
          parsePriority,
        ),
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (specPath: string, opts: SpotOpts) => {
        const { loadVmSpecFile } = await import('../../vm/spec.ts')
        const spec = await loadVmSpecFile(specPath).catch((err: Error) => {
          throw new UsageError(err.message, { cause: err })
        })
        const meta = spotMeta(opts)
        const wantsSpot = Object.keys(meta).length > 0
        if (wantsSpot && (await spotVms(opts)) === undefined)
          throw new UsageError('--standby, --standby-rate and --priority need a running agent (mesh agent)')
        const info = await withVms(opts, (c) => c.run(spec))
        if (wantsSpot) await withAgent(opts, (c) => c.call('spot.set', { vm: spec.name, meta }))
        if (opts.json) return printJson(info)
        process.stdout.write(`${formatTable(HEADER, [row(info)])}\n`)
      })
    cmd
      .command('set')
      .description(
        "change a VM's spot settings (its warm standby, its evacuation priority) on whichever member runs it",
      )
      .argument('<name>', 'VM name')
      .option(
        '--standby <peer>',
        "member that keeps a warm standby of its RAM ('auto' picks one, 'off' ends it)",
      )
      .addOption(
        new Option('--standby-rate <rate>', 'bandwidth of the standby sync, bytes/s').argParser(parseRate),
      )
      .addOption(
        new Option('--priority <n>', 'evacuations move higher priorities first').argParser(parsePriority),
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (name: string, opts: SpotOpts) => {
        const meta = spotMeta(opts)
        if (Object.keys(meta).length === 0)
          throw new UsageError('say what to set: --standby, --standby-rate or --priority')
        // On the member that runs the VM (an older agent: this host's settings, as before).
        const r = await withAgent(opts, async (c) => {
          try {
            return await c.call('vm.set-remote', { vm: name, meta })
          } catch (err) {
            if (!(err instanceof RemoteError && err.code === 'E_UNKNOWN_METHOD')) throw err
            return {
              vm: name,
              peer: '',
              member: '',
              here: true,
              spot: await c.call('spot.set', { vm: name, meta }),
            }
          }
        })
        if (opts.json) return printJson({ ...r.spot, ...(r.here ? {} : { member: r.member, peer: r.peer }) })
        process.stdout.write(`${JSON.stringify(r.spot)}${r.here ? '' : ` (on ${r.member})`}\n`)
      })
    cmd
      .command('ls')
      .description('list the VMs on this host (--all: on every member, asked now)')
      .option('--all', 'every member’s VMs, through the running agent', false)
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { json: boolean; all: boolean }) => {
        if (opts.all) {
          const res = await withAgent(opts, (c) => c.call('vm.ls-all'))
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
        const spot = await spotVms(opts)
        if (opts.json)
          return printJson({
            vms: vms.map((v) =>
              spot === undefined
                ? v
                : {
                    ...v,
                    ...(spot.vms[v.name]?.priority === undefined
                      ? {}
                      : { priority: spot.vms[v.name]!.priority }),
                    ...(spot.standbys[v.name] === undefined ? {} : { standby: spot.standbys[v.name] }),
                  },
            ),
          })
        if (spot === undefined) return void process.stdout.write(`${formatTable(HEADER, vms.map(row))}\n`)
        process.stdout.write(
          `${formatTable(
            [...HEADER, 'PRIO', 'STANDBY'],
            vms.map((v) => [...row(v), String(spot.vms[v.name]?.priority ?? 0), standbyCell(v.name, spot)]),
          )}\n`,
        )
      })
    cmd
      .command('stop')
      .description('stop a VM, on whichever member runs it (its RAM file and sockets are removed)')
      .argument('<name>', 'VM name')
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (name: string, opts: StateOpts & { json: boolean }) => {
        const r = await onVmHost(
          opts,
          (c) => c.stop(name),
          (a) => a.call('vm.stop-remote', { vm: name }),
        )
        const info = r.result ?? r.remote?.info
        if (opts.json)
          return printJson(
            r.remote === undefined ? info : { ...info, member: r.remote.member, peer: r.remote.peer },
          )
        const on = r.remote === undefined || r.remote.here ? '' : ` (on ${r.remote.member})`
        process.stdout.write(`${name} ${info?.status ?? 'stopped'}${on}\n`)
      })
    cmd
      .command('console')
      .description("print the last lines of a VM's serial console, from whichever member runs it")
      .argument('<name>', 'VM name')
      .addOption(new Option('-n, --lines <n>', 'how many lines').default('50'))
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (name: string, opts: StateOpts & { json: boolean; lines: string }) => {
        const n = Number(opts.lines)
        if (!Number.isInteger(n) || n < 1 || n > 10_000)
          throw new UsageError(`--lines must be a whole number from 1 to 10000, got '${opts.lines}'`)
        const r = await onVmHost(
          opts,
          (c) => c.console(name, n),
          (a) => a.call('vm.console-remote', { vm: name, lines: n }),
        )
        const lines = r.result ?? r.remote?.lines ?? []
        if (opts.json)
          return printJson({
            name,
            lines,
            ...(r.remote === undefined ? {} : { member: r.remote.member, peer: r.remote.peer }),
          })
        process.stdout.write(lines.length > 0 ? `${lines.join('\n')}\n` : '')
      })
    addFencingCommands(cmd)
    return cmd
  },
}
