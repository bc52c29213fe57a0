/**
 * A mesh testnet in one call, like hyperdht's createTestnet: NAT'd clouds (test/helpers/clouds.ts), a
 * bootstrap agent on the internet (circuit relay + STUN), optionally coturn on its own internet host,
 * and one real `mesh` agent process per cloud host, each joined with an invite through the CLI. Agents
 * are separate processes so a test can kill -9 one; destroy() removes every process, namespace and
 * state directory, even when the test failed.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtempSync, rmdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ramDirFor } from '../../src/agent/run.ts'
import { type CloudSpec, createClouds, type Host, outputLines, type Topology, waitForLine } from './clouds.ts'
import { startCoturn } from './coturn.ts'

export const MESH_BIN = fileURLToPath(new URL('../../bin/mesh.js', import.meta.url))
export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url))

export interface MeshResult {
  code: number
  stdout: string
  stderr: string
}

/** Runs the `mesh` CLI (in this namespace: the control socket is a file) with a timeout. */
export function mesh(args: string[], opts: { timeoutMs?: number; input?: string } = {}): Promise<MeshResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MESH_BIN, ...args], { stdio: ['pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (b: Buffer) => {
      stdout += b.toString()
    })
    child.stderr.on('data', (b: Buffer) => {
      stderr += b.toString()
    })
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000)
    child.on('error', reject)
    child.on('close', (code, sig) => {
      clearTimeout(timer)
      resolve({ code: code ?? (sig === null ? -1 : 128), stdout, stderr })
    })
    child.stdin.end(opts.input ?? '')
  })
}

/** Like mesh() but throws with the CLI's stderr on a non-zero exit; parses --json output. */
export async function meshJson<T>(args: string[], opts: { timeoutMs?: number } = {}): Promise<T> {
  const r = await mesh([...args, '--json'], opts)
  if (r.code !== 0) throw new Error(`mesh ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`)
  return JSON.parse(r.stdout) as T
}

export interface AgentProc {
  name: string
  host: Host
  state: string
  child: ChildProcess
  peerId: string
  /** Extra agent arguments it was started with (reused by restart()). */
  args: string[]
  /** Runs `mesh ARGS --state <this agent's state>`. */
  mesh(args: string[], opts?: { timeoutMs?: number; input?: string }): Promise<MeshResult>
  json<T>(args: string[], opts?: { timeoutMs?: number }): Promise<T>
  /** SIGKILL and wait for exit. */
  kill(): Promise<void>
  /** Starts `mesh agent` again on the same state dir (after kill()) without waiting. */
  start(): ChildProcess
  /** start() and wait until the agent is ready. */
  restart(): Promise<void>
  log(): string
}

export interface PeerRow {
  id: string
  name: string
  state: string
  link: string
  path?: string
  rttMs?: number
}

export interface TestnetOptions {
  clouds: CloudSpec[]
  /** Run coturn on an internet host 'turn' and give every agent its URL and credentials. */
  turn?: boolean
  /** Extra internet hosts (clients). */
  internetHosts?: string[]
  /** Extra `mesh agent` arguments for every member. */
  agentArgs?: string[]
  /** Don't join the cloud hosts (the test does it). */
  noJoin?: boolean
  /** Environment for agents (e.g. MESH_LOG=debug). */
  env?: NodeJS.ProcessEnv
}

export interface Testnet {
  topo: Topology
  dir: string
  boot: AgentProc
  agents: Map<string, AgentProc>
  turn?: { url: string; credentialsFile: string }
  /** Makes an invite on the bootstrap. */
  invite(opts?: { ttl?: string; bind?: string }): Promise<string>
  /** Joins a cloud host as a new member (its agent runs until destroy/kill). */
  join(
    hostName: string,
    opts?: { invite?: string; args?: string[]; waitReady?: boolean; name?: string },
  ): Promise<AgentProc>
  /** Waits until every listed agent sees an open link to every other listed agent. `commandTimeoutMs`
   *  bounds each `mesh peers` call (default 30 s; a CLI start alone takes several seconds on a loaded
   *  2-core machine). */
  waitForFullMesh(
    names: string[],
    timeoutMs?: number,
    opts?: { commandTimeoutMs?: number },
  ): Promise<Map<string, PeerRow[]>>
  /** What each agent says of its VMs, tunnel and recent log, for a failed test to print (never throws). */
  diagnose(): Promise<string>
  destroy(): Promise<void>
}

export async function createTestnet(opts: TestnetOptions): Promise<Testnet> {
  const internetHosts = ['boot', ...(opts.turn === true ? ['turn'] : []), ...(opts.internetHosts ?? [])]
  const topo = await createClouds({ clouds: opts.clouds, internetHosts })
  const dir = mkdtempSync(join(tmpdir(), 'mesh-testnet-'))
  const agents = new Map<string, AgentProc>()
  const env = { ...process.env, ...opts.env }
  let boot: AgentProc | undefined
  let turn: Testnet['turn']
  const cleanups: (() => void)[] = []

  const makeAgent = (name: string, host: Host, args: string[], initialChild: ChildProcess): AgentProc => {
    const state = join(dir, name)
    const a: AgentProc = {
      name,
      host,
      state,
      child: initialChild,
      peerId: '',
      args,
      mesh: (margs, o) => mesh([...margs, '--state', state], o),
      json: (margs, o) => meshJson([...margs, '--state', state], o),
      async kill() {
        const c = a.child
        if (c.exitCode !== null || c.signalCode !== null) return
        const exited = new Promise((r) => c.once('exit', r))
        try {
          process.kill(-c.pid!, 'SIGKILL')
        } catch {
          c.kill('SIGKILL')
        }
        await exited
      },
      start() {
        a.child = host.spawn(
          process.execPath,
          [MESH_BIN, 'agent', '--state', state, '--name', name, ...a.args],
          {
            env,
            cwd: REPO_ROOT,
          },
        )
        return a.child
      },
      async restart() {
        await waitForLine(a.start(), /agent ready/, 90_000)
      },
      log: () => outputLines(a.child).join('\n'),
    }
    return a
  }

  const readyPeerId = async (a: AgentProc) => {
    await waitForLine(a.child, /agent ready/, 90_000)
    const st = await a.json<{ net: { peerId: string } }>(['status'])
    a.peerId = st.net.peerId
  }

  try {
    if (opts.turn === true) {
      const c = await startCoturn(topo.host('turn'))
      turn = { url: c.url, credentialsFile: c.credentialsFile }
      cleanups.push(c.cleanup)
    }
    const bootHost = topo.host('boot')
    const bootState = join(dir, 'boot')
    const created = await mesh(['network', 'create', 'testnet', '--state', bootState])
    if (created.code !== 0) throw new Error(`network create failed: ${created.stderr}`)
    const bootArgs = ['--bootstrap', '--listen', `/ip4/${bootHost.ip}/tcp/4001`]
    const bootChild = bootHost.spawn(
      process.execPath,
      [MESH_BIN, 'agent', '--state', bootState, '--name', 'boot', ...bootArgs],
      { env, cwd: REPO_ROOT },
    )
    boot = makeAgent('boot', bootHost, bootArgs, bootChild)
    agents.set('boot', boot)
    await readyPeerId(boot)

    const net: Testnet = {
      topo,
      dir,
      boot,
      agents,
      ...(turn === undefined ? {} : { turn }),
      async invite(o = {}) {
        const args = [
          'invite',
          ...(o.ttl === undefined ? [] : ['--ttl', o.ttl]),
          ...(o.bind === undefined ? [] : ['--bind', o.bind]),
        ]
        const r = await boot!.mesh(args)
        if (r.code !== 0) throw new Error(`mesh invite failed: ${r.stderr}`)
        return r.stdout.trim()
      },
      async join(hostName, o = {}) {
        const host = topo.host(hostName)
        const invite = o.invite ?? (await net.invite())
        const args = [
          ...(turn === undefined ? [] : ['--ice', turn.url, '--turn-credentials', turn.credentialsFile]),
          ...(opts.agentArgs ?? []),
          ...(o.args ?? []),
        ]
        const name = o.name ?? hostName
        const state = join(dir, name)
        // The invite goes through stdin: it is a credential and must not sit in argv.
        const child = host.spawn(
          process.execPath,
          [MESH_BIN, 'join', '-', '--state', state, '--name', name, ...args],
          { env, cwd: REPO_ROOT, stdio: ['pipe', 'pipe', 'pipe'] },
        )
        child.stdin?.end(`${invite}\n`)
        const a = makeAgent(name, host, args, child)
        agents.set(name, a)
        if (o.waitReady !== false) await readyPeerId(a)
        return a
      },
      async waitForFullMesh(names, timeoutMs = 90_000, wopts = {}) {
        const deadline = Date.now() + timeoutMs
        let last = new Map<string, PeerRow[]>()
        for (;;) {
          last = new Map()
          let ok = true
          for (const n of names) {
            const a = agents.get(n)
            if (a === undefined) throw new Error(`no agent ${n}`)
            const r = await a.mesh(['peers', '--json'], { timeoutMs: wopts.commandTimeoutMs ?? 30_000 })
            const rows = r.code === 0 ? (JSON.parse(r.stdout) as { peers: PeerRow[] }).peers : []
            last.set(n, rows)
            for (const other of names) {
              if (other === n) continue
              if (!rows.some((p) => p.name === other && p.link === 'open')) ok = false
            }
          }
          if (ok) return last
          if (Date.now() > deadline) {
            const view = [...last].map(
              ([n, rows]) => `${n}: ${rows.map((p) => `${p.name}=${p.link}/${p.path ?? '-'}`).join(' ')}`,
            )
            throw new Error(
              `no full mesh among ${names.join(',')} after ${timeoutMs} ms:\n${view.join('\n')}`,
            )
          }
          await new Promise((r) => setTimeout(r, 1000))
        }
      },
      async diagnose() {
        const out: string[] = []
        for (const a of agents.values()) {
          out.push(
            `--- ${a.name} (${a.peerId.slice(-8)}), agent ${a.child.exitCode === null && a.child.signalCode === null ? 'running' : 'exited'}`,
          )
          for (const args of [['vm', 'ls'], ['status']]) {
            const r = await a.mesh([...args, '--json'], { timeoutMs: 20_000 }).catch((e: unknown) => ({
              code: -1,
              stdout: '',
              stderr: String(e),
            }))
            let text = r.stdout.trim()
            if (args[0] === 'status') {
              // The tunnel part is what a lost guest needs: its ports, held frames and drops.
              try {
                text = JSON.stringify((JSON.parse(text) as { tunnel?: unknown }).tunnel ?? null)
              } catch {}
            }
            out.push(`mesh ${args.join(' ')}: ${r.code === 0 ? text : `exit ${r.code}: ${r.stderr.trim()}`}`)
            if (args[0] === 'vm' && r.code === 0) {
              try {
                for (const vm of (JSON.parse(text) as { vms: { name: string }[] }).vms) {
                  const c = await a.mesh(['vm', 'console', vm.name, '--lines', '15'], { timeoutMs: 20_000 })
                  out.push(`console of ${vm.name}:`, c.stdout.trim())
                }
              } catch (err) {
                out.push(`(console: ${String(err)})`)
              }
            }
          }
          const lines = a.log().split('\n')
          const notable = lines.filter((l) => /warn|error|exited|VM /i.test(l)).slice(-30)
          out.push('notable log lines:', ...notable, 'last log lines:', ...lines.slice(-25))
        }
        return out.join('\n')
      },
      async destroy() {
        await topo.destroy()
        // Guest RAM files of VMs still running at the end (their QEMUs died with the namespaces).
        for (const a of agents.values()) rmSync(ramDirFor(a.state), { recursive: true, force: true })
        // Their parent, the agents' default /dev/shm/mesh, too, unless something else keeps files there.
        if ([...agents.values()].some((a) => dirname(ramDirFor(a.state)) === '/dev/shm/mesh')) {
          try {
            rmdirSync('/dev/shm/mesh')
          } catch {
            // Not empty (in use outside this testnet) or already gone: leave it.
          }
        }
        for (const c of cleanups) c()
        rmSync(dir, { recursive: true, force: true })
      },
    }
    if (opts.noJoin !== true) {
      for (const c of topo.clouds) for (const h of c.hosts) await net.join(h.name)
    }
    return net
  } catch (err) {
    const bootLog = boot?.log()
    await topo.destroy()
    for (const c of cleanups) c()
    rmSync(dir, { recursive: true, force: true })
    if (bootLog !== undefined && err instanceof Error) err.message += `\nbootstrap log:\n${bootLog}`
    throw err
  }
}

/** The last JSON document in a command's output (progress events come first, one per line). */
export function lastJson<T>(stdout: string): T {
  const text = stdout.trimEnd()
  for (let i = text.lastIndexOf('{'); i >= 0; i = text.lastIndexOf('{', i - 1)) {
    if (i > 0 && text[i - 1] !== '\n') continue
    try {
      return JSON.parse(text.slice(i)) as T
    } catch {
      // Not the start of the last document yet: keep walking back.
    }
  }
  throw new Error(`no JSON in output:\n${stdout.slice(-500)}`)
}

/**
 * Boots the guest fixture as VM `name` on an agent through `mesh vm run`, and waits for its ready line
 * on the serial console. The guest's NIC is plugged into the overlay (its IP is `ip`, CIDR).
 */
export async function runGuestVm(
  agent: AgentProc,
  image: { kernel: string; initrd: string },
  opts: { name: string; ip: string; memoryMiB?: number; timeoutMs?: number },
): Promise<void> {
  const spec = join(agent.state, `${opts.name}.vm.json`)
  writeFileSync(
    spec,
    JSON.stringify({
      name: opts.name,
      memoryMiB: opts.memoryMiB ?? 256,
      vcpus: 1,
      kernel: image.kernel,
      initrd: image.initrd,
      ip: opts.ip,
    }),
  )
  const run = await agent.mesh(['vm', 'run', spec], { timeoutMs: 120_000 })
  if (run.code !== 0) throw new Error(`mesh vm run failed: ${run.stderr}`)
  const deadline = Date.now() + (opts.timeoutMs ?? 120_000)
  for (;;) {
    const c = await agent.mesh(['vm', 'console', opts.name])
    if (/MESH-GUEST-READY/.test(c.stdout)) return
    if (Date.now() > deadline) throw new Error(`guest ${opts.name} not ready:\n${c.stdout.slice(-2000)}`)
    await new Promise((r) => setTimeout(r, 1000))
  }
}
