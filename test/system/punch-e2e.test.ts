/**
 * TCP paths for bulk channels between NAT'd members that cannot dial each other (e2e, CLI): two
 * members behind cone NATs get a hole-punched TCP connection (TCP simultaneous open, coordinated over
 * their signaling stream); a member behind a symmetric NAT cannot be punched and falls back to the
 * relayed TCP connection through the bootstrap. Data pulled over either is byte-identical, `mesh
 * peers` names the path, and the agents' TCP sockets run the congestion control they asked for.
 */
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { type AgentProc, createTestnet, type PeerRow, type Testnet } from '../../fixtures/testnet/testnet.ts'
import { waitUntil } from '../helpers/wait.ts'

/** `mesh peers --json` rows. */
type Row = PeerRow

describe("TCP hole punching and relay for bulk channels across NAT'd clouds (e2e, CLI)", function () {
  this.timeout(300_000)
  let net: Testnet | undefined
  const agents: Record<string, AgentProc> = {}

  const rows = async (a: AgentProc) => (await a.json<{ peers: Row[] }>(['peers'])).peers
  const row = async (a: AgentProc, name: string) => (await rows(a)).find((r) => r.name === name)
  const until = (what: string, cond: () => Promise<boolean>, ms = 90_000) =>
    waitUntil(what, cond, { timeoutMs: ms, intervalMs: 500 })

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft'] })
    net = await createTestnet({
      clouds: [
        { name: 'ca', hosts: ['a'] },
        { name: 'cb', hosts: ['b'] },
        { name: 'sy', nat: 'symmetric', hosts: ['s'] },
      ],
      turn: true,
    })
    for (const n of ['a', 'b', 's']) agents[n] = net.agents.get(n)!
    await net.waitForFullMesh(['a', 'b', 's'], 150_000)
  })

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined) process.stdout.write(await net.diagnose())
  })

  after(async () => {
    await net?.destroy()
  })

  it('cone↔cone: the bulk channels move to a punched TCP connection between the two NATs', async () => {
    await until('a → b punched', async () => (await row(agents.a!, 'b'))?.bulk === 'tcp-punch')
    await until('b → a punched', async () => (await row(agents.b!, 'a'))?.bulk === 'tcp-punch')
    const ab = (await row(agents.a!, 'b'))!
    const bPublic = net!.topo.cloud('cb').publicIp
    assert.match(ab.direct ?? '', new RegExp(`^/ip4/${bPublic.replace(/\./g, '\\.')}/tcp/\\d+/p2p/`))
    const shown = await agents.a!.mesh(['peers'])
    assert.match(shown.stdout, /\+tcp-punch/)
  })

  it('cone↔symmetric: no punch; the bulk channels ride the relayed TCP connection through the bootstrap', async () => {
    await until('a → s relayed', async () => (await row(agents.a!, 's'))?.bulk === 'tcp-relay')
    const as = (await row(agents.a!, 's'))!
    assert.match(as.direct ?? '', /\/p2p-circuit\//)
    assert.equal(as.link, 'open')
    await until('s → a relayed', async () => (await row(agents.s!, 'a'))?.bulk === 'tcp-relay')
  })

  it('pulls identical bytes over the punched and the relayed path', async () => {
    const data = randomBytes(8 * 1024 * 1024)
    const file = join(net!.dir, 'payload.bin')
    writeFileSync(file, data)
    const push = await agents.a!.mesh(['image', 'push', file, '--name', 'payload:1', '--json'], {
      timeoutMs: 120_000,
    })
    assert.equal(push.code, 0, push.stderr)
    for (const who of ['b', 's']) {
      const out = join(net!.dir, `out-${who}`)
      const pull = await agents[who]!.mesh(['image', 'pull', 'payload:1', '--dir', out, '--json'], {
        timeoutMs: 240_000,
      })
      assert.equal(pull.code, 0, pull.stderr)
      const got = readFileSync(join(out, 'payload.bin'))
      assert.equal(
        createHash('sha256').update(got).digest('hex'),
        createHash('sha256').update(data).digest('hex'),
        `${who} got every byte`,
      )
    }
  })

  it('the agents set BBR on their TCP sockets', async () => {
    const st = await agents.a!.json<{
      net: { tcpCongestion: { wanted: string; applied: number; failed: number } }
    }>(['status'])
    const cc = st.net.tcpCongestion
    assert.equal(cc.wanted, 'bbr')
    assert.ok(cc.applied > 0, `applied on ${cc.applied} sockets`)
    assert.equal(cc.failed, 0)
  })
})
