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
import { CONTROL_METHODS } from '../../src/control/api.ts'

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
})
