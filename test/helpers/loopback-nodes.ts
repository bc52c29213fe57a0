/**
 * Mesh nodes on loopback for system tests: one call in a `describe` registers the hooks that stop the
 * nodes, remove their state dirs and print the last log lines of a failed test.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { MeshNode, MeshNodeInit } from '../../net/interfaces.ts'
import { createMeshNode } from '../../net/node.ts'
import type { Logger } from '../../src/base/log.ts'
import { waitUntil } from './wait.ts'

/** Records `message` alone (tests match `NAME: message`), every level. */
function plainLog(push: (msg: string) => void): Logger {
  const log: Logger = { debug: push, info: push, warn: push, error: push, child: () => log }
  return log
}

export function waitFor(what: string, cond: () => boolean, timeoutMs = 60_000): Promise<void> {
  return waitUntil(what, cond, { timeoutMs, intervalMs: 50 })
}

export interface LoopbackNodes {
  /** A node listening on 127.0.0.1 with werift links on loopback (not started). */
  mk(name: string, extra?: Partial<MeshNodeInit>): Promise<MeshNode>
  readonly logs: string[]
}

export function useLoopbackNodes(): LoopbackNodes {
  const nodes: MeshNode[] = []
  const dirs: string[] = []
  const logs: string[] = []
  after(async () => {
    for (const n of nodes) await n.stop().catch(() => {})
    for (const d of dirs) await rm(d, { recursive: true, force: true })
  })
  afterEach(function () {
    if (this.currentTest?.state === 'failed') process.stdout.write(`${logs.slice(-120).join('\n')}\n`)
  })
  return {
    logs,
    async mk(name, extra = {}) {
      const d = await mkdtemp(join(tmpdir(), 'mesh-node-'))
      dirs.push(d)
      const n = createMeshNode({
        stateDir: d,
        name,
        listen: ['/ip4/127.0.0.1/tcp/0'],
        webrtc: { iceAdditionalHostAddresses: ['127.0.0.1'], iceInterfaceAddress: '127.0.0.1' },
        timing: { tickMs: 250 },
        log: plainLog((msg) => logs.push(`${name}: ${msg}`)),
        ...extra,
      })
      nodes.push(n)
      return n
    },
  }
}
