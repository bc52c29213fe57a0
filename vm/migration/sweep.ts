import { readdir, readFile, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

/** RAM files of incoming migrations are named `<vm>.in-<8 hex>.ram` (see host.ts, manager-host.ts). */
const INCOMING_RE = /\.in-[0-9a-f]{8}\.ram$/

export interface SweepResult {
  removedFiles: string[]
  killedPids: number[]
}

async function pidsUsing(path: string): Promise<number[]> {
  const pids: number[] = []
  for (const name of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue
    const cmd = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')
    if (cmd.includes(path)) pids.push(Number(name))
  }
  return pids
}

/**
 * Removes what an agent killed during an incoming migration left behind: an incoming QEMU (detached,
 * so it outlives the agent) and its RAM file. Call at agent start, after the VM manager re-adopted its
 * VMs: files in use by a VM it knows, and those of moves committed here (the ledger's incoming records,
 * which the migration service re-adopts), are `inUse` and kept. Any other leftover never ran the guest
 * (the destination resumes only after the source's commit, and records the commit durably before it
 * resumes), so killing it loses nothing.
 */
export async function sweepIncoming(ramDir: string, inUse: ReadonlySet<string>): Promise<SweepResult> {
  const result: SweepResult = { removedFiles: [], killedPids: [] }
  for (const name of await readdir(ramDir).catch(() => [] as string[])) {
    if (!INCOMING_RE.test(name)) continue
    const path = join(ramDir, name)
    if (inUse.has(path)) continue
    const pids = await pidsUsing(path)
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL')
        result.killedPids.push(pid)
      } catch {
        // already gone
      }
    }
    for (let i = 0; i < 50 && (await pidsUsing(path)).length > 0; i++) await sleep(20)
    await rm(path, { force: true })
    result.removedFiles.push(path)
  }
  return result
}
