/**
 * Spot-test helpers for namespaces of the clouds fixture: a fake metadata server on 169.254.169.254:80
 * inside one host's namespace (like a cloud's, reachable only from that instance), and the hard end of
 * a spot host (network cut, every process in its namespace killed).
 */
import { type ChildProcess, execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { Host } from '../../fixtures/testnet/clouds.ts'
import { outputLines, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { REPO_ROOT } from '../../fixtures/testnet/testnet.ts'
import type { FakeProvider, FakeRequest } from './fake-metadata.ts'

const run = promisify(execFile)
export const METADATA_IP = '169.254.169.254'
const FAKE = join(REPO_ROOT, 'test/helpers/fake-metadata.ts')

export interface NamespaceMetadata {
  child: ChildProcess
  /** Announces a notice; resolves with Date.now() when the server has it. */
  notice(seconds?: number): Promise<number>
  send(line: string): void
  requests(): FakeRequest[]
  acks(): string[]
}

/**
 * Puts 169.254.169.254 on the loopback of the host's namespace and serves the provider's fake
 * there (port 80). Everything lives in the namespace, so the topology's destroy() removes it.
 */
export async function startNamespaceMetadata(
  host: Host,
  provider: FakeProvider,
  vmName = host.name,
): Promise<NamespaceMetadata> {
  // On the namespace's loopback (this kernel has no dummy interfaces): only this host reaches it.
  await host.run('ip', ['link', 'set', 'lo', 'up'])
  await host.run('ip', ['addr', 'add', `${METADATA_IP}/32`, 'dev', 'lo'])
  const child = host.spawn(process.execPath, ['--import', 'tsx', FAKE, provider, METADATA_IP, '80', vmName], {
    cwd: REPO_ROOT,
    stdio: ['pipe', 'pipe', 'pipe'],
  })
  await waitForLine(child, /"event":"listening"/, 30_000)
  const events = (kind: string) =>
    outputLines(child)
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { event: string } & Record<string, unknown>)
      .filter((e) => e.event === kind)
  return {
    child,
    send: (line) => child.stdin?.write(`${line}\n`),
    async notice(seconds) {
      const before = events('notice').length
      child.stdin?.write(`notice${seconds === undefined ? '' : ` ${seconds}`}\n`)
      for (;;) {
        const n = events('notice')
        if (n.length > before) return n.at(-1)!.at as number
        await new Promise((r) => setTimeout(r, 10))
      }
    },
    requests: () => events('request') as unknown as FakeRequest[],
    acks: () => events('ack').map((e) => String(e.id)),
  }
}

/** Cuts the host off the network and SIGKILLs every process in its namespace (agent, QEMUs, helpers). */
export async function killHost(host: Host): Promise<number[]> {
  await host.exec('ip', ['link', 'set', 'eth0', 'down'])
  const { stdout } = await run('ip', ['netns', 'pids', host.ns])
  const pids = stdout
    .split('\n')
    .map((s) => Number.parseInt(s, 10))
    .filter((n) => Number.isInteger(n) && n > 0)
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL')
    } catch {
      // Gone already.
    }
  }
  return pids
}
