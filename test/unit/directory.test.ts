import assert from 'node:assert/strict'
import fc from 'fast-check'
import { createDiag } from '../../net/diag/diag.ts'
import { createDirectory, type VmEntry } from '../../net/directory/directory.ts'
import {
  DirectoryDecodeError,
  DirectoryType,
  decodeDirectory,
  encodeDirectory,
  HEADER,
} from '../../net/directory/v1/messages.ts'
import { createMemoryNetwork } from '../../net/link/memory.ts'
import { createLogger } from '../../src/base/log.ts'

describe('VM directory (names from any member)', () => {
  it('lists every linked member’s VMs and finds one by name, alongside diag on the control channel', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    net.connect('a', 'c')
    const vms: Record<string, VmEntry[]> = {
      a: [],
      b: [{ name: 'g1', status: 'running', ip: '10.99.0.10/24', mac: '52:54:00:00:00:01' }],
      c: [
        { name: 'g1', status: 'exited' },
        { name: 'g2', status: 'running' },
      ],
    }
    const dirs = ['a', 'b', 'c'].map((n) =>
      createDirectory({ overlay: net.node(n), local: async () => vms[n]! }),
    )
    const warnings: string[] = []
    const diag = createDiag(net.node('b'), createLogger({ level: 'debug', sink: (l) => warnings.push(l) }))
    const diagA = createDiag(net.node('a'))
    try {
      const all = await dirs[0]!.list()
      assert.deepEqual(all.map((p) => [p.peer, p.vms.map((v) => v.name)]).sort(), [
        ['b', ['g1']],
        ['c', ['g1', 'g2']],
      ])
      // The running copy wins over an exited record of the same name.
      const found = await dirs[0]!.find('g1')
      assert.equal(found?.peer, 'b')
      assert.equal(found?.vm.ip, '10.99.0.10/24')
      assert.equal(await dirs[0]!.find('nope'), undefined)
      // Moves are followed: nothing is cached.
      vms.c = [{ name: 'g1', status: 'running' }]
      vms.b = []
      assert.equal((await dirs[0]!.find('g1'))?.peer, 'c')
      // diag still works on the shared channel and does not complain about directory messages.
      assert.ok((await diagA.ping('b')) >= 0)
      assert.deepEqual(warnings, [])
    } finally {
      for (const d of dirs) d.stop()
      diag.stop()
      diagA.stop()
    }
  })

  it('finds a VM on a member it keeps no link to, through a link built on demand', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const vms: Record<string, VmEntry[]> = { a: [], b: [], c: [{ name: 'g3', status: 'running' }], d: [] }
    const built: string[] = []
    const node = net.node('a')
    // A large mesh's overlay: a keeps a link to b only and builds others when asked.
    const overlay = {
      ...node,
      self: node.self,
      link: node.link.bind(node),
      links: node.links.bind(node),
      onLink: node.onLink.bind(node),
      connect: async (peer: string) => {
        if (node.link(peer) === undefined) {
          built.push(peer)
          net.connect('a', peer)
        }
        const l = node.link(peer)
        if (l === undefined) throw new Error(`no link to ${peer}`)
        return l
      },
    }
    const dirs = [
      createDirectory({ overlay, local: async () => vms.a!, members: () => ['a', 'b', 'c', 'd'] }),
      ...['b', 'c', 'd'].map((n) => createDirectory({ overlay: net.node(n), local: async () => vms[n]! })),
    ]
    try {
      // Periodic views ask the linked members only.
      assert.deepEqual(
        (await dirs[0]!.list()).map((p) => p.peer),
        ['b'],
      )
      assert.deepEqual(built, [])
      const found = await dirs[0]!.find('g3')
      assert.equal(found?.peer, 'c')
      assert.equal(found?.vm.status, 'running')
      // Everyone, on request (`mesh vm ls --all`): c's link is there now, d's is built.
      const all = await dirs[0]!.list({ everyone: true })
      assert.deepEqual(all.map((p) => [p.peer, p.vms.map((v) => v.name)]).sort(), [
        ['b', []],
        ['c', ['g3']],
        ['d', []],
      ])
      assert.deepEqual([...built].sort(), ['c', 'd'])
      assert.equal(await dirs[0]!.find('nope'), undefined)
    } finally {
      for (const d of dirs) d.stop()
    }
  })

  it('reports a member that does not answer instead of waiting forever', async () => {
    const net = createMemoryNetwork()
    net.connect('a', 'b')
    const a = createDirectory({ overlay: net.node('a'), local: async () => [] })
    try {
      const r = await a.list({ timeoutMs: 100 })
      assert.equal(r.length, 1)
      assert.match(r[0]!.error ?? '', /no answer/)
    } finally {
      a.stop()
    }
  })

  it('round-trips messages and rejects bad ones with DirectoryDecodeError only', () => {
    const q = encodeDirectory({ type: DirectoryType.Query, id: 7, vm: 'g1' })
    assert.deepEqual(decodeDirectory(q), { type: DirectoryType.Query, id: 7, vm: 'g1' })
    const r = encodeDirectory({
      type: DirectoryType.Reply,
      id: 9,
      vms: [{ name: 'g1', status: 'running', vcpus: 1 }],
    })
    assert.deepEqual(decodeDirectory(r), {
      type: DirectoryType.Reply,
      id: 9,
      vms: [{ name: 'g1', status: 'running', vcpus: 1 }],
    })
    const bad = (body: string, type: number = DirectoryType.Reply) => {
      const b = new TextEncoder().encode(body)
      const m = new Uint8Array(HEADER + b.length)
      m.set([0x44, 1, type, 0, 0, 0, 1])
      m.set(b, HEADER)
      return m
    }
    for (const m of [
      bad('{"vms":[{"name":"../x","status":"running"}]}'),
      bad('{"vms":[{"name":"g","status":"running","ip":"1.2.3.4; rm"}]}'),
      bad('{"vms":"x"}'),
      bad('[1]'),
      bad('{'),
      bad('{"vm":5}', DirectoryType.Query),
      bad('{}', 9),
      new Uint8Array([0x44, 2, 1, 0, 0, 0, 0, 123, 125]),
    ])
      assert.throws(() => decodeDirectory(m), DirectoryDecodeError)
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        try {
          decodeDirectory(bytes)
        } catch (err) {
          assert.ok(err instanceof DirectoryDecodeError, String(err))
        }
      }),
      { numRuns: 2000 },
    )
  })
})
