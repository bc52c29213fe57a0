/**
 * The survival client (fixtures/testnet/stream-client.ts) as a program inside a network namespace, the
 * one way the in-process rigs start it (tunnel-rig.ts and tunnel-migration-rig.ts each had a copy).
 * `result` settles when the client ends: by itself after `durationMs` (and its catch-up), by `stop()`
 * (SIGTERM: it still prints its result), or killed after `timeoutMs`. It rejects when the client printed
 * no result, with the end of its stderr.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { StreamEchoResult } from '../../fixtures/testnet/stream-client.ts'

const ROOT = resolve(fileURLToPath(new URL('../..', import.meta.url)))
const CLIENT = join(ROOT, 'fixtures/testnet/stream-client.ts')

export interface StreamClientRun {
  readonly child: ChildProcess
  readonly result: Promise<StreamEchoResult>
  /** Ends the run early and returns its result. */
  stop(): Promise<StreamEchoResult>
}

export function runStreamClient(
  netns: string,
  ip: string,
  port: number,
  durationMs: number,
  timeoutMs?: number,
): StreamClientRun {
  const child = spawn(
    'ip',
    [
      'netns',
      'exec',
      netns,
      process.execPath,
      '--import',
      'tsx',
      CLIENT,
      ip,
      String(port),
      String(durationMs),
    ],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  )
  let out = ''
  let err = ''
  child.stdout.setEncoding('utf8').on('data', (s: string) => {
    out += s
  })
  child.stderr.setEncoding('utf8').on('data', (s: string) => {
    err = (err + s).slice(-2000)
  })
  const timer = timeoutMs === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), timeoutMs)
  const result = new Promise<StreamEchoResult>((resolveResult, reject) => {
    child.once('error', (e) => {
      clearTimeout(timer)
      reject(e)
    })
    child.once('close', (code) => {
      clearTimeout(timer)
      const line = out.trim().split('\n').at(-1) ?? ''
      try {
        resolveResult(JSON.parse(line) as StreamEchoResult)
      } catch {
        reject(new Error(`stream client printed no result (code ${code}): ${err}`))
      }
    })
  })
  result.catch(() => {})
  return {
    child,
    result,
    stop() {
      child.kill('SIGTERM')
      return result
    },
  }
}
