/**
 * The destination's way into an incoming VM's disk: QEMU's NBD server with a writable export of the
 * disk's node, the way libvirt's storage migration does it. QEMU opens an incoming VM's disks inactive
 * until the migration completes; a block export activates its node, so the blocks written here are
 * what the guest reads once it resumes, through QEMU's own caches (writing the qcow2 file behind
 * QEMU's back would corrupt it).
 */
import { join } from 'node:path'
import { describeError } from '../../src/base/errors.ts'
import { NbdClient } from './nbd.ts'
import { DiskTrackerError, type QmpExec } from './tracker.ts'

export interface DiskWriter {
  /** The disk's virtual size. */
  readonly size: number
  write(offset: number, data: Uint8Array): Promise<void>
  /** Everything written is stable on the host (NBD flush). */
  flush(): Promise<void>
  /** Removes the export and stops the NBD server. Idempotent. */
  close(): Promise<void>
}

const EXPORT = 'mesh-disk-in'

export async function openDiskWriter(init: { qmp: QmpExec; node: string; dir: string }): Promise<DiskWriter> {
  const { qmp, node } = init
  const sock = join(init.dir, 'nbd-in.sock')
  let serverUp = false
  let exported = false
  let client: NbdClient | undefined
  const close = async () => {
    client?.close()
    client = undefined
    if (exported) {
      exported = false
      await qmp('block-export-del', { id: EXPORT, mode: 'hard' }).catch(() => {})
    }
    if (serverUp) {
      serverUp = false
      await qmp('nbd-server-stop').catch(() => {})
    }
  }
  try {
    await qmp('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } })
    serverUp = true
    await qmp('block-export-add', {
      type: 'nbd',
      id: EXPORT,
      'node-name': node,
      name: EXPORT,
      writable: true,
    })
    exported = true
    client = await NbdClient.connect(sock, EXPORT)
  } catch (err) {
    await close()
    throw new DiskTrackerError(`cannot open the incoming disk '${node}' for writing: ${describeError(err)}`, {
      cause: err,
    })
  }
  const c = client
  return {
    size: c.size,
    write: (offset, data) => c.write(offset, data),
    flush: () => c.flush(),
    close,
  }
}
