/**
 * The agent's directory service acting on a VM where it runs (#19 "names work everywhere"): `vm.set-remote`
 * changes a VM's spot settings on the member that runs it, through the agent call `vm.set`; here when
 * this host runs it; a clear E_VM_NOT_FOUND when nobody does. Two services on an in-memory network, agent
 * calls routed in process.
 */
import assert from 'node:assert/strict'
import type { MeshNode } from '../../net/interfaces.ts'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import type { AgentCalls, PeerCallHandler } from '../../src/agent/calls/calls.ts'
import { createDirectoryService, type SpotSetResult } from '../../src/agent/services/directory.ts'
import { silentLogger } from '../../src/base/log.ts'
import type { VmInfo } from '../../vm/manager.ts'

const vm = (name: string): VmInfo => ({
  name,
  status: 'running',
  pid: 1,
  memoryMiB: 256,
  vcpus: 1,
  mac: '52:54:00:00:00:01',
  ip: undefined,
  memoryPath: `/tmp/${name}.ram`,
  consolePath: undefined,
  startedAt: new Date(0).toISOString(),
})

describe('directory service: vm.set-remote acts on the member that runs the VM', () => {
  it("changes b's settings for b's VM when asked on a; here when a runs it; E_VM_NOT_FOUND otherwise", async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const names = ['a', 'b']
    const running: Record<string, VmInfo[]> = { a: [vm('g2')], b: [vm('g1')] }
    const spotSets: Record<string, { vm: string; meta: unknown }[]> = { a: [], b: [] }
    // Agent calls between the two, in process (the real ones ride the same links).
    const handlers: Record<string, Map<string, PeerCallHandler>> = { a: new Map(), b: new Map() }
    const callsOf = (self: string): AgentCalls => ({
      name: 'calls',
      async start() {},
      async stop() {},
      handlers: () => ({}),
      register(hs) {
        for (const [k, h] of Object.entries(hs)) handlers[self]!.set(k, h)
      },
      async call(peer, method, params) {
        const h = handlers[peer]?.get(method)
        if (h === undefined) throw new Error(`${peer} serves no ${method}`)
        return h(params, { peer: self } as Parameters<PeerCallHandler>[1])
      },
      peers: () => names.filter((n) => n !== self),
    })
    const services = names.map((self) => {
      const calls = callsOf(self)
      const node = {
        peerId: self,
        overlay: net.node(self),
        members: () => names.map((n) => ({ peerId: n, name: `host-${n}`, self: n === self, state: 'up' })),
      } as unknown as MeshNode
      return createDirectoryService({
        node,
        local: async () => running[self]!,
        calls: () => calls,
        spotSet: async (p) => {
          spotSets[self]!.push(p)
          return { vm: p.vm, ...(p.meta as object) } as SpotSetResult
        },
        log: silentLogger,
      })
    })
    const ctx = { emit: () => {}, signal: new AbortController().signal }
    for (const s of services) await s.start(new AbortController().signal)
    try {
      const onA = services[0]!.handlers()['vm.set-remote']
      const r = await onA({ vm: 'g1', meta: { priority: 7 } }, ctx)
      assert.deepEqual([r.member, r.peer, r.here, r.spot], ['host-b', 'b', false, { vm: 'g1', priority: 7 }])
      assert.deepEqual(spotSets, { a: [], b: [{ vm: 'g1', meta: { priority: 7 } }] })
      const here = await onA({ vm: 'g2', meta: { standby: 'off' } }, ctx)
      assert.deepEqual([here.member, here.here], ['host-a', true])
      assert.deepEqual(spotSets.a, [{ vm: 'g2', meta: { standby: 'off' } }])
      await assert.rejects(
        onA({ vm: 'nosuchvm', meta: { priority: 1 } }, ctx),
        (err: Error & { code?: string }) => {
          assert.equal(err.code, 'E_VM_NOT_FOUND')
          assert.match(err.message, /no member runs a VM named 'nosuchvm'/)
          return true
        },
      )
      // A member asked for a VM it does not run (it moved away) refuses, so the asker looks again.
      await assert.rejects(
        callsOf('a').call('b', 'vm.set', { vm: 'g2', meta: { priority: 1 } }),
        (err: Error & { code?: string }) => err.code === 'E_VM_NOT_FOUND',
      )
      assert.equal(spotSets.b!.length, 1)
    } finally {
      for (const s of services) await s.stop()
    }
  })
})
