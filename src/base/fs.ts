/**
 * Durable replacement of small state files. THE fsync policy of mesh, in one place:
 *
 * - State that decides ownership or identity is written with writeFileDurable(): fencing tokens, switch,
 *   commit and post-copy records (vm/migration/ledger.ts, manager-host.ts), the VM manager's per-VM
 *   records (vm/manager.ts), the member state `network.json` (net/node/state.ts), the node identity and
 *   the network key (created once: `exclusive`), the spot state (draining, per-VM priority/standby) and
 *   image records (tag → manifests). The new content goes to a temporary file in the same directory,
 *   which is fsynced and closed, renamed over the target (or, `exclusive`, hard-linked to a name that
 *   must not exist yet), and then the directory is fsynced. After a crash or a power loss the target
 *   holds the old content or the new one (never a torn mix), and once the call has returned the new
 *   content survives a power loss.
 * - Chunk data and manifests (net/chunks/store.ts) fsync themselves (content-addressed, verified).
 * - What only saves work or is rebuilt on start may use plain writes: caches, progress, logs, the web
 *   view's token (new each start), the agent's pid lock, cgroup/proc control files.
 *
 * Why not the `write-file-atomic` package: it fsyncs the file but not the directory, so the rename
 * itself may be lost on power failure; the whole procedure is these few lines.
 */
import { randomBytes } from 'node:crypto'
import { link, open, readFile, rename, rm } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { describeError, MeshError } from './errors.ts'

export interface DurableWriteOptions {
  /** File mode of a new file (default 0o600: state files are private). */
  mode?: number
  /** Create only: fail with the EEXIST error when `path` exists (keys written once, never replaced). */
  exclusive?: boolean
}

/** Writes `data` to `path` atomically and durably (see the policy above). */
export async function writeFileDurable(
  path: string,
  data: string | Uint8Array,
  options: DurableWriteOptions = {},
): Promise<void> {
  const dir = dirname(path)
  const tmp = join(dir, `.${basename(path)}.${randomBytes(4).toString('hex')}.tmp`)
  const fh = await open(tmp, 'wx', options.mode ?? 0o600)
  try {
    try {
      await fh.writeFile(data)
      await fh.sync()
    } finally {
      await fh.close()
    }
    if (options.exclusive === true) {
      await link(tmp, path) // atomic create-if-absent: EEXIST when another writer got there first
      await rm(tmp, { force: true })
    } else await rename(tmp, path)
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => {})
    throw err
  }
  await syncDir(dir)
}

/** fsyncs a directory (makes a rename or a new entry in it durable). */
export async function syncDir(dir: string): Promise<void> {
  const d = await open(dir, 'r')
  try {
    await d.sync()
  } finally {
    await d.close()
  }
}

/** A state file exists but cannot be read as what it must be (a JSON object). */
export class StateFileError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_STATE_FILE' })
  }
}

/**
 * Reads a state file holding one JSON object: {} when it does not exist yet (first start), a
 * StateFileError naming the file otherwise. Never treats an unreadable or corrupt file as empty: for
 * the fencing ledger that would forget which VMs this host committed to (writeFileDurable means a torn
 * write cannot cause it; a disk fault or a hand edit can).
 */
export async function readJsonObjectFile(path: string): Promise<Record<string, unknown>> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {}
    throw new StateFileError(`cannot read state file ${path}: ${describeError(err)}`, { cause: err })
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (err) {
    throw new StateFileError(
      `state file ${path} is not valid JSON (${describeError(err)}); it records what this host owns: restore it, or move it aside to start without it`,
      { cause: err },
    )
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
    throw new StateFileError(`state file ${path} does not hold a JSON object`)
  return parsed as Record<string, unknown>
}
