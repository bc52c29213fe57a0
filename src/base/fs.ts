/**
 * Durable replacement of small state files.
 *
 * fsync policy: every file whose content decides who owns what — fencing tokens, migration switch and
 * commit records, the VM manager's per-VM records — is written with writeFileDurable(): the new content
 * goes to a temporary file in the same directory, which is fsynced and closed, renamed over the target,
 * and then the directory is fsynced. After a crash or a power loss the target holds the old content or
 * the new one (never a torn mix), and once the call has returned the new content survives a power loss.
 * State that only saves work (caches, progress, logs) may use plain writes.
 *
 * Why not the `write-file-atomic` package: it fsyncs the file but not the directory, so the rename
 * itself may be lost on power failure; the whole procedure is these few lines.
 */
import { randomBytes } from 'node:crypto'
import { open, rename, rm } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'

export interface DurableWriteOptions {
  /** File mode of a new file (default 0o600: state files are private). */
  mode?: number
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
    await rename(tmp, path)
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
