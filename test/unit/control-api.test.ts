/**
 * The control API map (src/control/api.ts) against the agent the CLI talks to: the agent is composed by
 * the production buildAgent (src/agent/run.ts) in a scratch state dir, not started, and the methods it
 * would serve must be exactly the map's. The compiler checks each service's handlers against the map
 * (`satisfies ControlHandlers<…>`); this test catches a handler registered another way, or a method the
 * map lists that no service serves any more.
 */
import assert from 'node:assert/strict'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createNetwork, saveNetworkKey } from '../../net/membership/network.ts'
import { buildAgent, NETWORK_KEY_FILE } from '../../src/agent/run.ts'
import { silentLogger } from '../../src/base/log.ts'
import { CONTROL_METHODS, type ControlHandlers, type PeerRow } from '../../src/control/api.ts'
import { connectControl } from '../../src/control/client.ts'
import { createControlServer } from '../../src/control/server.ts'

describe('control API map (src/control/api.ts)', () => {
  it('lists exactly the methods the composed agent serves', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mesh-control-api-'))
    const ramDir = process.env.MESH_RAM_DIR
    process.env.MESH_RAM_DIR = join(dir, 'ram')
    try {
      await saveNetworkKey(join(dir, NETWORK_KEY_FILE), await createNetwork('api-test'))
      const agent = await buildAgent({ state: dir, name: 'api-test' }, silentLogger)
      const served = agent.methods()
      const mapped = new Set<string>(CONTROL_METHODS)
      assert.ok(served.length > 20, `the agent serves ${served.length} methods: ${served.join(' ')}`)
      assert.deepEqual(
        served.filter((m) => !mapped.has(m)),
        [],
        'served by the agent but missing from ControlApi (add them to src/control/api.ts)',
      )
      assert.deepEqual(
        CONTROL_METHODS.filter((m) => !served.includes(m)),
        [],
        'in ControlApi but served by no service',
      )
    } finally {
      if (ramDir === undefined) delete process.env.MESH_RAM_DIR
      else process.env.MESH_RAM_DIR = ramDir
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it("a typed call round-trips: params, events and result keep the map's shapes", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mesh-control-api-'))
    const row: PeerRow = { id: 'p-b', name: 'b', state: 'up', link: 'open', path: 'srflx', rttMs: 1.5 }
    const handlers = {
      peers: async () => ({ peers: [row] }),
      ping: async (params, ctx) => {
        const peer = (params as { peer?: unknown }).peer
        if (typeof peer !== 'string') throw new Error('peer must be a string')
        for (const seq of [1, 2]) ctx.emit({ seq, rttMs: seq + 0.5 })
        return { peer, peerId: `p-${peer}`, rttMs: [1.5, 2.5] }
      },
    } satisfies Partial<ControlHandlers>
    const server = createControlServer({ path: join(dir, 'control.sock'), handlers })
    await server.start()
    const c = await connectControl(join(dir, 'control.sock'))
    try {
      const seqs: number[] = []
      const r = await c.call('ping', { peer: 'b', count: 2 }, { onEvent: (e) => seqs.push(e.seq) })
      assert.deepEqual(seqs, [1, 2])
      assert.deepEqual(r.rttMs, [1.5, 2.5])
      assert.equal(r.peerId, 'p-b')
      assert.deepEqual((await c.call('peers')).peers, [row])
      // Never called: `npm run typecheck` (tsc over test/) needs each line below to be an error, so a
      // known method can never slip through the untyped overload.
      const mistakes = async () => [
        // @ts-expect-error: migrate needs { vm, to }
        await c.call('migrate', {}),
        // @ts-expect-error: peer is a string
        await c.call('ping', { peer: 1 }),
        // @ts-expect-error: the result is typed (vm.ls has no 'nothing')
        (await c.call('vm.ls')).nothing,
      ]
      assert.equal(typeof mistakes, 'function')
    } finally {
      c.close()
      await server.stop()
      rmSync(dir, { recursive: true, force: true })
    }
  })
})
