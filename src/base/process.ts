import { readFileSync } from 'node:fs'

/**
 * Whether a process exists and has not exited. A zombie (exited, not yet reaped by its parent or by
 * init) counts as gone: an orphaned QEMU killed while no agent watched stays a zombie until init reaps
 * it, which takes seconds under some inits, and signal 0 still "reaches" it.
 */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false
  }
  try {
    // /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces and parentheses, so read after the last ')'.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z'
  } catch {
    return false // gone between the two looks (or no /proc: then signal 0 said enough)
  }
}
