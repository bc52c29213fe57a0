/**
 * How much a process was starved by the box: Linux schedstat (/proc/PID/task/TID/schedstat: ns on a CPU,
 * ns runnable but waiting for one), summed over its threads. A repeat or a skipped wall-clock judgement
 * in a system test is allowed only when this says the box starved the try (see test/helpers/sctp-pair.ts
 * for the same rule on the test's own thread), never on a slow but idle box.
 */
import { readdirSync, readFileSync } from 'node:fs'

export interface CpuTimes {
  /** ms on a CPU, all threads. */
  runMs: number
  /** ms runnable but waiting for a CPU, all threads. */
  waitMs: number
  /** ms the main thread (the event loop) was runnable but waiting for a CPU. */
  mainWaitMs: number
}

/** The process's CPU and run-queue time so far (zeros when it is gone or schedstat is missing). */
export function cpuTimes(pid: number): CpuTimes {
  let runMs = 0
  let waitMs = 0
  let mainWaitMs = 0
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      try {
        const [run, wait] = readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')
        runMs += Number(run) / 1e6
        waitMs += Number(wait) / 1e6
        if (tid === String(pid)) mainWaitMs = Number(wait) / 1e6
      } catch {
        // the thread ended between the listing and the read
      }
    }
  } catch {
    // the process is gone: what was read so far
  }
  return { runMs, waitMs, mainWaitMs }
}

/** ms the process's main thread (the event loop) has been runnable but waiting for a CPU so far: one
 *  file, for callers that read it often (0 where schedstat is missing). */
export function mainWaitMs(pid: number = process.pid): number {
  try {
    return Number(readFileSync(`/proc/${pid}/schedstat`, 'utf8').split(' ')[1]) / 1e6
  } catch {
    return 0
  }
}

/** Share of the time the process wanted a CPU between two readings that it spent waiting for one. */
export function waitShare(before: CpuTimes, after: CpuTimes): number {
  const run = after.runMs - before.runMs
  const wait = after.waitMs - before.waitMs
  return run + wait > 0 ? wait / (run + wait) : 0
}
