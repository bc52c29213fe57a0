/**
 * `mesh image push/pull` between agents in different NAT'd clouds, through the CLI: the pulled files
 * are byte-identical, and a v2 that shares 90% of its chunks with v1 moves about 10% of its bytes.
 */
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { createTestnet, lastJson, type Testnet } from '../../fixtures/testnet/testnet.ts'

const CHUNK = 64 * 1024
const SIZE = 160 * CHUNK // 10 MiB

interface PullResult {
  event: string
  bytesFetched: number
  bytesSkipped: number
}

describe("mesh image push/pull across NAT'd clouds (e2e, CLI)", function () {
  this.timeout(300_000)
  let net: Testnet | undefined

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft'] })
    net = await createTestnet({ clouds: [{ name: 'a' }, { name: 'b' }] })
    await net.waitForFullMesh(['a1', 'b1'], 150_000)
  })

  after(async () => {
    await net?.destroy()
  })

  it('pulls identical bytes, then only the changed ~10% of a v2', async () => {
    const a1 = net!.agents.get('a1')!
    const b1 = net!.agents.get('b1')!
    const v1 = randomBytes(SIZE)
    const v2 = Buffer.from(v1)
    // Change every tenth chunk: v2 shares 90% of its chunks with v1.
    for (let c = 0; c < SIZE / CHUNK; c += 10) randomBytes(CHUNK).copy(v2, c * CHUNK)
    const f1 = join(net!.dir, 'disk-v1.img')
    const f2 = join(net!.dir, 'disk.img')
    writeFileSync(f1, v1)
    writeFileSync(f2, v2)

    const push1 = await a1.mesh(['image', 'push', f1, '--name', 'disk:1', '--json'], { timeoutMs: 120_000 })
    assert.equal(push1.code, 0, push1.stderr)
    const out1 = join(net!.dir, 'out1')
    const pull1 = await b1.mesh(['image', 'pull', 'disk:1', '--dir', out1, '--json'], { timeoutMs: 240_000 })
    assert.equal(pull1.code, 0, pull1.stderr)
    assert.ok(readFileSync(join(out1, 'disk-v1.img')).equals(v1), 'v1 bytes differ after the pull')

    const push2 = await a1.mesh(['image', 'push', f2, '--name', 'disk:2', '--json'], { timeoutMs: 120_000 })
    assert.equal(push2.code, 0, push2.stderr)
    const out2 = join(net!.dir, 'out2')
    const pull2 = await b1.mesh(['image', 'pull', 'disk:2', '--dir', out2, '--json'], { timeoutMs: 240_000 })
    assert.equal(pull2.code, 0, pull2.stderr)
    assert.ok(readFileSync(join(out2, 'disk.img')).equals(v2), 'v2 bytes differ after the pull')
    const res = lastJson<PullResult>(pull2.stdout)
    const ratio = res.bytesFetched / SIZE
    process.stdout.write(
      `      v2 pull fetched ${res.bytesFetched} B of ${SIZE} (${(ratio * 100).toFixed(1)}%), skipped ${res.bytesSkipped} B\n`,
    )
    assert.ok(ratio > 0.08 && ratio < 0.15, `v2 pull moved ${(ratio * 100).toFixed(1)}% of its bytes`)
  })
})
