/**
 * `npm run bench -- cli [--runs N] [--idle-s S]`: how fast `mesh` starts and how small an idle agent is,
 * as users run it (bin/mesh.js → the compiled bundle in dist/), against the same commands run from the
 * TypeScript sources through tsx (what bin/mesh.js did before dist/) in the same run.
 *
 * Measured, medians of N runs (default 5; agents: 3):
 *   cliHelpMs     `mesh --help`, wall time of the whole process
 *   cliStatusMs   `mesh status` against a running agent
 *   agentRssMB    VmRSS of an agent with a network and no links after S s idle (default 8)
 * Last stdout line (via test/bench/main.ts):
 *   {"bench":"cli","cliHelpMs":…,"cliStatusMs":…,"agentRssMB":…,"tsx":{…},"ratio":{…},"targets":{…}}
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { loadavg, tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { waitUntil } from '../helpers/wait.ts'

const ROOT = fileURLToPath(new URL('../..', import.meta.url))
const BIN = join(ROOT, 'bin/mesh.js')
const SRC_MAIN = join(ROOT, 'src/main.ts')
const log = (s: string) => process.stderr.write(`[bench cli] ${s}\n`)

type Variant = 'dist' | 'tsx'
/** How each variant starts `mesh`: the bin (what users run) or the sources through tsx (the old bin). */
const argv = (v: Variant, args: string[]): string[] =>
  v === 'dist' ? [BIN, ...args] : ['--import', 'tsx', '--no-warnings=ExperimentalWarning', SRC_MAIN, ...args]

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2
}

/** One `mesh ARGS` as users run it (`dist`) or from the sources (`tsx`): wall time and output (bench scale reuses it). */
export function run(v: Variant, args: string[]): Promise<{ ms: number; code: number; stdout: string }> {
  const t0 = performance.now()
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, argv(v, args), { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (b: Buffer) => {
      stdout += b.toString()
    })
    child.stderr.on('data', (b: Buffer) => {
      stderr += b.toString()
    })
    child.on('error', reject)
    child.on('close', (code) => {
      const ms = performance.now() - t0
      if (code !== 0) reject(new Error(`mesh ${args.join(' ')} (${v}) exited ${code}: ${stderr.trim()}`))
      else resolve({ ms, code: code ?? -1, stdout })
    })
  })
}

function rssMB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  if (m === null) throw new Error(`no VmRSS for ${pid}`)
  return Number(m[1]) / 1024
}

const waitFor = (cond: () => boolean, timeoutMs: number, what: string) =>
  waitUntil(what, cond, { timeoutMs, intervalMs: 50 })

/** An agent with a fresh network and no links, on loopback; stopped by the returned function. */
async function startAgent(
  v: Variant,
  state: string,
): Promise<{ child: ChildProcess; stop(): Promise<void> }> {
  await run('dist', ['network', 'create', 'bench', '--state', state])
  const child = spawn(
    process.execPath,
    argv(v, ['agent', '--state', state, '--listen', '/ip4/127.0.0.1/tcp/0']),
    { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] },
  )
  let err = ''
  child.stderr!.on('data', (b: Buffer) => {
    err += b.toString()
  })
  const exited = new Promise<void>((r) => child.once('exit', () => r()))
  try {
    await waitFor(
      () => existsSync(join(state, 'control.sock')) || child.exitCode !== null,
      60_000,
      'the agent socket',
    )
    if (child.exitCode !== null) throw new Error(`agent exited ${child.exitCode}: ${err}`)
  } catch (e) {
    child.kill('SIGKILL')
    throw e
  }
  return {
    child,
    async stop() {
      child.kill('SIGTERM')
      const t = setTimeout(() => child.kill('SIGKILL'), 10_000)
      await exited
      clearTimeout(t)
    },
  }
}

export async function main(args: string[]): Promise<Record<string, unknown>> {
  const opt = (name: string, def: number) => {
    const i = args.indexOf(name)
    return i >= 0 ? Number(args[i + 1]) : def
  }
  const runs = opt('--runs', 5)
  const agents = opt('--agents', 3)
  const idleS = opt('--idle-s', 8)
  const load = loadavg()[0]!
  // Builds dist/ if a source changed, so that no run below pays for it.
  await run('dist', ['--version'])
  const out: Record<Variant, { help: number[]; status: number[]; rss: number[] }> = {
    dist: { help: [], status: [], rss: [] },
    tsx: { help: [], status: [], rss: [] },
  }
  const dir = mkdtempSync(join(tmpdir(), 'mesh-bench-cli-'))
  try {
    for (let i = 0; i < runs; i++) {
      for (const v of ['dist', 'tsx'] as const) out[v].help.push((await run(v, ['--help'])).ms)
    }
    log(
      `--help dist ${out.dist.help.map((x) => x.toFixed(0))} tsx ${out.tsx.help.map((x) => x.toFixed(0))} ms`,
    )
    for (let a = 0; a < agents; a++) {
      for (const v of ['dist', 'tsx'] as const) {
        const state = join(dir, `${v}-${a}`)
        const agent = await startAgent(v, state)
        try {
          await new Promise((r) => setTimeout(r, idleS * 1000))
          out[v].rss.push(rssMB(agent.child.pid!))
          // The client side of status, both ways, against the same agent.
          for (let i = 0; i < runs; i++) {
            for (const c of ['dist', 'tsx'] as const) {
              const r = await run(c, ['status', '--json', '--state', state])
              JSON.parse(r.stdout) // a real answer, not an error text
              if (c === 'dist' && v === 'dist') out.dist.status.push(r.ms)
              if (c === 'tsx' && v === 'dist') out.tsx.status.push(r.ms)
            }
          }
        } finally {
          await agent.stop()
        }
        log(`agent ${v} #${a}: ${out[v].rss.at(-1)!.toFixed(1)} MB RSS after ${idleS} s idle`)
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
  const m = (xs: number[]) => Math.round(median(xs) * 10) / 10
  const dist = { cliHelpMs: m(out.dist.help), cliStatusMs: m(out.dist.status), agentRssMB: m(out.dist.rss) }
  const tsx = { cliHelpMs: m(out.tsx.help), cliStatusMs: m(out.tsx.status), agentRssMB: m(out.tsx.rss) }
  return {
    ...dist,
    tsx,
    ratio: {
      cliHelp: Math.round((dist.cliHelpMs / tsx.cliHelpMs) * 1000) / 1000,
      cliStatus: Math.round((dist.cliStatusMs / tsx.cliStatusMs) * 1000) / 1000,
      agentRss: Math.round((dist.agentRssMB / tsx.agentRssMB) * 1000) / 1000,
    },
    targets: {
      cliHelpMs: dist.cliHelpMs <= 250,
      cliStatusMs: dist.cliStatusMs <= 300,
      agentRssMB: dist.agentRssMB <= 80,
    },
    samples: { dist: out.dist, tsx: out.tsx },
    runs,
    agents,
    idleS,
    load1: load,
  }
}
