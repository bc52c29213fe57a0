import { Option } from 'commander'
import { defaultStateDir, statePaths } from '../config.ts'
import { type ControlClient, connectControl } from '../control/client.ts'

/** `--state DIR`: which agent a command talks to (default $MESH_STATE, else the per-user state dir). */
export function stateOption(): Option {
  return new Option('--state <dir>', 'agent state directory (env MESH_STATE)').default(
    undefined,
    defaultStateDir(),
  )
}

export function jsonOption(): Option {
  return new Option('--json', 'print machine-readable JSON instead of text').default(false)
}

export interface StateOpts {
  state?: string
}

export function resolveState(opts: StateOpts): string {
  return opts.state ?? defaultStateDir()
}

/** Connects to the agent for this state dir, runs fn, and always closes the connection. */
export async function withAgent<T>(opts: StateOpts, fn: (client: ControlClient) => Promise<T>): Promise<T> {
  const client = await connectControl(statePaths(resolveState(opts)).controlSocket)
  try {
    return await fn(client)
  } finally {
    client.close()
  }
}

/** An AbortSignal that fires on Ctrl-C / SIGTERM, so long commands cancel cleanly on the agent. */
export function interruptSignal(): AbortSignal {
  const ac = new AbortController()
  const onSig = () => ac.abort(new Error('interrupted'))
  process.once('SIGINT', onSig)
  process.once('SIGTERM', onSig)
  return ac.signal
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`)
}

/** Left-aligned text table; columns sized to their widest cell. */
export function formatTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)))
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0)))
      .join('  ')
      .trimEnd()
  return [line(header), ...rows.map(line)].join('\n')
}
