import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { PeerProcess } from '../helpers/webrtc-peer-process.ts'
import { type SignalRelay, startSignalRelay } from '../helpers/webrtc-signal-relay.ts'
import type { ChunkNodeConfig } from './chunk-node.ts'

const NODE_SCRIPT = fileURLToPath(new URL('./chunk-node.ts', import.meta.url))

/** Chunk nodes in separate processes over real werift links (loopback): the service is transport-agnostic. */
describe('chunk exchange between processes over WebRTC', function () {
  this.timeout(240_000)
  let dir: string
  let relay: SignalRelay
  const procs: PeerProcess[] = []

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'chunk-rtc-'))
    relay = await startSignalRelay('127.0.0.1')
  })
  after(async () => {
    for (const p of procs) p.child.kill('SIGKILL')
    await relay?.close()
    await rm(dir, { recursive: true, force: true })
  })

  async function start(name: string, links: ChunkNodeConfig['links']): Promise<PeerProcess> {
    const cfg: ChunkNodeConfig = {
      name,
      store: join(dir, name),
      relay: { host: '127.0.0.1', port: relay.port },
      links,
      iceAdditionalHostAddresses: ['127.0.0.1'],
    }
    const path = join(dir, `${name}.json`)
    await writeFile(path, JSON.stringify(cfg), { mode: 0o600 })
    const p = new PeerProcess(
      spawn(process.execPath, ['--import', 'tsx', NODE_SCRIPT, path], { stdio: 'pipe' }),
    )
    procs.push(p)
    return p
  }

  const sha = async (f: string) =>
    createHash('sha256')
      .update(await readFile(f))
      .digest('hex')

  it('fetches from two holders; one holder killed -9 mid-fetch → completes from the other, bytes identical', async () => {
    const MiB = 1024 * 1024
    // Big enough that both holders' request windows (8 MiB each) refill several times: when the kill
    // comes, the killed holder still owes requested chunks, and the fetch cannot end before its link dies.
    const size = 48 * MiB
    const src = join(dir, 'src.bin')
    const h1 = await start('h1', [{ peer: 'd', initiator: true, room: 'h1-d' }])
    h1.send({ cmd: 'seed', file: src, mib: size / MiB })
    const { id } = (await h1.next('seeded', 60_000)) as unknown as { id: string }
    const h2 = await start('h2', [{ peer: 'd', initiator: true, room: 'h2-d' }])
    h2.send({ cmd: 'seed', file: src })
    await h2.next('seeded', 60_000)
    const d = await start('d', [
      { peer: 'h1', initiator: false, room: 'h1-d' },
      { peer: 'h2', initiator: false, room: 'h2-d' },
    ])
    for (const p of [h1, h2, d]) p.send({ cmd: 'connect' })
    await d.next('open', 90_000)
    const out = join(dir, 'out.bin')
    d.send({ cmd: 'fetch', id, file: out })
    // Kill one holder once the fetch is under way from both (its link dies; the link notices within seconds).
    for (;;) {
      const p = (await d.next('progress', 120_000)) as unknown as { bytesFetched: number; peers: number }
      assert.equal(p.peers, 2, 'both holders serve the fetch')
      if (p.bytesFetched >= 4 * MiB) break
    }
    h2.child.kill('SIGKILL')
    const r = await d.next('fetched', 180_000)
    assert.equal(r.bytesFetched, size)
    assert.equal(r.peers, 1, 'the killed holder’s link should have died during the fetch')
    assert.equal(await sha(out), await sha(src))
  })
})
