/**
 * Direct paths between agents in NAT'd clouds (e2e, CLI): a member whose router forwards its libp2p
 * port (a cloud VM with a public IP) gets its links' bulk channels moved to a direct TCP connection —
 * from a cone-NAT'd member and from a symmetric-NAT'd one — while two members that cannot dial each
 * other, one behind a symmetric NAT (no TCP punch possible: test/system/punch-e2e.test.ts), move them
 * to the relayed TCP connection through the bootstrap. Data pulled over the direct path is
 * byte-identical.
 */
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  type PeerRow,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import { waitUntil } from '../helpers/wait.ts'

/** `mesh peers --json` rows. */
type Row = PeerRow

const PORT = 4101

describe("direct paths for bulk channels across NAT'd clouds (e2e, CLI)", function () {
  this.timeout(300_000)
  let net: Testnet | undefined
  let pub: string
  const agents: Record<string, AgentProc> = {}

  const rows = async (a: AgentProc) => (await a.json<{ peers: Row[] }>(['peers'])).peers
  const until = (what: string, cond: () => Promise<boolean>, ms = 60_000) =>
    waitUntil(what, cond, { timeoutMs: ms, intervalMs: 500 })

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft'] })
    net = await createTestnet({
      clouds: [
        { name: 'pub', hosts: ['srv'] },
        { name: 'cone', hosts: ['cn'] },
        { name: 'sym', nat: 'symmetric', hosts: ['sy'] },
      ],
      turn: true,
      noJoin: true,
    })
    pub = await net.topo.clouds.find((c) => c.name === 'pub')!.forwardTcp(PORT)
    agents.srv = await net.join('srv', { args: ['--listen', `/ip4/0.0.0.0/tcp/${PORT}`, '--announce', pub] })
    agents.cn = await net.join('cn')
    agents.sy = await net.join('sy')
    await net.waitForFullMesh(['srv', 'cn', 'sy'], 150_000)
  })

  after(async () => {
    await net?.destroy()
  })

  it('moves bulk channels to the public member directly, from cone and symmetric NATs; relayed between the NATs', async () => {
    for (const who of ['cn', 'sy']) {
      await until(`${who} → srv direct`, async () =>
        (await rows(agents[who]!)).some((r) => r.name === 'srv' && r.direct !== undefined),
      )
      const r = (await rows(agents[who]!)).find((x) => x.name === 'srv')!
      assert.equal(r.direct, `${pub}/p2p/${agents.srv!.peerId}`, `${who} dials the forwarded public port`)
      assert.equal(r.bulk, 'tcp')
      assert.equal(r.link, 'open')
    }
    // srv sees the same links as direct (from the NATs' public addresses).
    await until(
      'srv sees both direct',
      async () =>
        (await rows(agents.srv!)).filter((r) => ['cn', 'sy'].includes(r.name) && r.direct !== undefined)
          .length === 2,
    )
    // The two NAT'd members cannot dial each other, and the symmetric NAT defeats a punch: their bulk
    // channels ride the relayed TCP connection through the bootstrap (not TURN).
    await until('cn → sy relayed', async () =>
      (await rows(agents.cn!)).some((r) => r.name === 'sy' && r.bulk === 'tcp-relay'),
    )
    const cnSy = (await rows(agents.cn!)).find((x) => x.name === 'sy')!
    assert.equal(cnSy.link, 'open')
    assert.match(cnSy.direct ?? '', /\/p2p-circuit\//)
    assert.equal(cnSy.path, 'relay') // symmetric NAT: the WebRTC link itself goes through TURN
  })

  it('pulls identical bytes over the direct path; the plain libp2p stream bench uses it too', async () => {
    const data = randomBytes(12 * 1024 * 1024)
    const file = join(net!.dir, 'payload.bin')
    writeFileSync(file, data)
    const push = await agents.srv!.mesh(['image', 'push', file, '--name', 'payload:1', '--json'], {
      timeoutMs: 120_000,
    })
    assert.equal(push.code, 0, push.stderr)
    for (const who of ['cn', 'sy']) {
      const out = join(net!.dir, `out-${who}`)
      const pull = await agents[who]!.mesh(['image', 'pull', 'payload:1', '--dir', out, '--json'], {
        timeoutMs: 240_000,
      })
      assert.equal(pull.code, 0, pull.stderr)
      const got = readFileSync(join(out, 'payload.bin'))
      assert.equal(
        createHash('sha256').update(got).digest('hex'),
        createHash('sha256').update(data).digest('hex'),
      )
    }
    const bench = await agents.cn!.mesh(['bench', 'srv', '--over', 'libp2p', '--mib', '16', '--json'], {
      timeoutMs: 120_000,
    })
    assert.equal(bench.code, 0, bench.stderr)
    const r = lastJson<{ path: string; mbps: number; bytes: number }>(bench.stdout)
    assert.equal(r.path, 'direct-tcp')
    assert.equal(r.bytes, 16 * 1024 * 1024)
    assert.ok(r.mbps > 0)
  })
})
