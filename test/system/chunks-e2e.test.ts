/**
 * The chunk exchange between agent PROCESSES in separate NAT'd clouds (issue #4), through the CLI:
 *   - a member that serves forged chunks (test/helpers/forger-agent.ts: a real agent whose store flips
 *     a byte of everything it reads) is rejected and distrusted, and the pull completes, byte-identical,
 *     from the honest holder; a later pull does not ask the forger at all;
 *   - three holders in three clouds, one killed with SIGKILL mid-pull: the pull completes from the
 *     other two, byte-identical, and the killed holder's in-flight chunks were asked of the others.
 * One testnet (clouds a, b, c, d; one host each) serves both cases: c1 is the forger first, then a
 * normal agent again on the same state dir.
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { waitForLine } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import {
  type AgentProc,
  createTestnet,
  lastJson,
  REPO_ROOT,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import type { ImageProgress } from '../../net/chunks/images.ts'
import { connectControl } from '../../src/control/client.ts'

const MiB = 1024 * 1024
const FORGER = fileURLToPath(new URL('../helpers/forger-agent.ts', import.meta.url))

interface PullResult {
  event: string
  bytesFetched: number
  bytesFromPeer: Record<string, number>
  badPeers: string[]
  chunksRequeued: number
}

interface WireStats {
  blocksServed: number
  rejectedBlocks: number
  peersDistrusted: number
}

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex')

/** Writes SIZE random bytes into the testnet dir; returns the path and the bytes' sha256. */
function randomFile(dir: string, name: string, size: number): { path: string; sha: string } {
  const data = randomBytes(size)
  const path = join(dir, name)
  writeFileSync(path, data)
  return { path, sha: sha(data) }
}

async function wire(a: AgentProc): Promise<WireStats> {
  const st = await a.json<{ chunks: { chunks: { wire: WireStats } } }>(['status'])
  return st.chunks.chunks.wire
}

async function push(a: AgentProc, file: string, ref: string): Promise<void> {
  const r = await a.mesh(['image', 'push', file, '--name', ref, '--json'], { timeoutMs: 120_000 })
  assert.equal(r.code, 0, `push on ${a.name}: ${r.stderr}`)
}

/**
 * `image.pull` on A's control socket (what `mesh image pull` calls), every progress event the agent streams
 * handed to the caller as it comes, to act mid-pull. Not the CLI's --json lines: the CLI prints at most one
 * per 500 ms, and a pull over the punched TCP path moves ~40 MiB in that time here, so on a 2-3x faster box
 * the whole pull ended before the second line (the freeze below never happened). The agent's events come
 * every 1/64 of the image (the puller's step), whatever the speed.
 */
async function pullWithEvents(
  a: AgentProc,
  ref: string,
  dir: string,
  onEvent: (e: ImageProgress) => void,
  timeoutMs: number,
): Promise<PullResult> {
  const client = await connectControl(join(a.state, 'control.sock'))
  try {
    const res = await client.call(
      'image.pull',
      { ref, dir },
      { onEvent, signal: AbortSignal.timeout(timeoutMs) },
    )
    return res as unknown as PullResult
  } finally {
    client.close()
  }
}

describe("chunk exchange between agents in NAT'd clouds: forged chunks, killed holder (e2e)", function () {
  this.timeout(300_000)
  let net: Testnet | undefined
  let forger: ChildProcess | undefined

  const agent = (name: string) => net!.agents.get(name)!
  const killForger = async () => {
    const f = forger
    forger = undefined
    if (f === undefined || f.exitCode !== null || f.signalCode !== null) return
    const exited = new Promise((r) => f.once('exit', r))
    try {
      process.kill(-f.pid!, 'SIGKILL')
    } catch {
      f.kill('SIGKILL')
    }
    await exited
  }

  before(async function () {
    // Five agents and six WebRTC links to set up: minutes when the 2 cores are shared.
    this.timeout(480_000)
    requireOrSkip(this, { root: true, commands: ['ip', 'nft'] })
    net = await createTestnet({ clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }, { name: 'd' }] })
    // c1 joined as a normal member; it now runs as the forger on the same state (same PeerId).
    const c1 = agent('c1')
    await c1.kill()
    forger = c1.host.spawn(
      process.execPath,
      ['--import', 'tsx', FORGER, '--state', c1.state, '--name', 'c1'],
      { cwd: REPO_ROOT, env: process.env },
    )
    await waitForLine(forger, /agent ready/, 90_000)
    await net.waitForFullMesh(['a1', 'b1', 'c1', 'd1'], 240_000, { commandTimeoutMs: 30_000 })
  })

  after(async () => {
    await killForger()
    await net?.destroy()
  })

  it('forged chunks from a member are rejected, the forger is not asked again, the pull completes from an honest holder', async () => {
    const [a1, c1, d1] = [agent('a1'), agent('c1'), agent('d1')]
    // Bigger than one fetch window (8 MiB per peer), so both holders are asked for chunks.
    const size1 = 12 * MiB
    const f1 = randomFile(net!.dir, 'forged-1.img', size1)
    await push(a1, f1.path, 'forged:1')
    await push(c1, f1.path, 'forged:1')

    const out1 = join(net!.dir, 'out-forged-1')
    const pull1 = await d1.mesh(['image', 'pull', 'forged:1', '--dir', out1, '--json'], {
      timeoutMs: 180_000,
    })
    assert.equal(pull1.code, 0, pull1.stderr)
    assert.equal(sha(readFileSync(join(out1, 'forged-1.img'))), f1.sha, 'pulled bytes differ')
    const r1 = lastJson<PullResult>(pull1.stdout)
    process.stdout.write(`      pull 1: ${JSON.stringify({ ...r1, record: undefined })}\n`)
    assert.deepEqual(r1.badPeers, [c1.peerId], 'the forger is reported as a bad peer')
    assert.equal(r1.bytesFromPeer[c1.peerId] ?? 0, 0, 'no byte from the forger was accepted')
    assert.equal(r1.bytesFromPeer[a1.peerId], size1, 'everything came from the honest holder')
    const forgerServed = (await wire(c1)).blocksServed
    const d1Wire = await wire(d1)
    assert.ok(forgerServed > 0, 'the forger was asked for chunks')
    assert.ok(d1Wire.rejectedBlocks >= 1 && d1Wire.peersDistrusted === 1, JSON.stringify(d1Wire))
    assert.match(d1.log(), /do not match chunk/)

    // A second image both hold: the distrusted forger is not asked for a single chunk.
    const f2 = randomFile(net!.dir, 'forged-2.img', 4 * MiB)
    await push(a1, f2.path, 'forged:2')
    await push(c1, f2.path, 'forged:2')
    const out2 = join(net!.dir, 'out-forged-2')
    const pull2 = await d1.mesh(['image', 'pull', 'forged:2', '--dir', out2, '--json'], {
      timeoutMs: 180_000,
    })
    assert.equal(pull2.code, 0, pull2.stderr)
    assert.equal(sha(readFileSync(join(out2, 'forged-2.img'))), f2.sha, 'pulled bytes differ')
    const r2 = lastJson<PullResult>(pull2.stdout)
    assert.deepEqual(r2.bytesFromPeer, { [a1.peerId]: 4 * MiB })
    // The forger may still be serving what pull 1 queued with it (its blocksServed grows after pull 1 ends):
    // what matters is that none of forged:2's chunks was asked of it.
    const forgedReads = new Set(readFileSync(join(c1.state, 'forged-reads.log'), 'utf8').split('\n'))
    const chunkHashes = (file: string) => {
      const data = readFileSync(file)
      const out: string[] = []
      for (let o = 0; o < data.length; o += 64 * 1024)
        out.push(
          createHash('sha256')
            .update(data.subarray(o, o + 64 * 1024))
            .digest('hex'),
        )
      return out
    }
    // The log names chunks as the store does (64 KiB chunks, sha256): pull 1's are there.
    assert.ok(
      chunkHashes(f1.path).some((h) => forgedReads.has(h)),
      'the forger logged the chunks it served',
    )
    const askedAgain = chunkHashes(f2.path).filter((h) => forgedReads.has(h))
    assert.equal(askedAgain.length, 0, `the forger was asked for ${askedAgain.length} chunks of forged:2`)
    assert.equal((await wire(d1)).rejectedBlocks, d1Wire.rejectedBlocks)
  })

  it('swarm: three holders in three clouds, one killed -9 mid-pull → the pull completes, bytes identical', async () => {
    // c1 becomes an honest member again (the forger's store on disk is intact: it only forged reads).
    // d1 distrusts c1's PeerId for as long as its chunk service runs, so a1 pulls this time, from
    // b1, c1 and d1 (three clouds other than its own).
    await killForger()
    const [a1, b1, c1, d1] = [agent('a1'), agent('b1'), agent('c1'), agent('d1')]
    await c1.restart()
    await net!.waitForFullMesh(['a1', 'c1'], 150_000, { commandTimeoutMs: 30_000 })

    // Twelve fetch windows (8 MiB per peer): every holder keeps chunks in flight until the end, also
    // over the fast TCP paths between NAT'd members (with three windows the killed holder had
    // delivered its whole share before the progress event that triggers the kill arrived).
    const size = 96 * MiB
    const f = randomFile(net!.dir, 'swarm.img', size)
    for (const h of [b1, c1, d1]) await push(h, f.path, 'swarm:1')

    const out = join(net!.dir, 'out-swarm')
    // b1 is frozen (SIGSTOP) at the first progress event past 10% and killed -9 once the others have
    // delivered another quarter of the image: while frozen it takes the puller's requests and answers
    // none, so it owes chunks when it dies. Killed at once, it had at times delivered everything it was
    // asked by then, and then there was nothing in flight to ask of the others (chunksRequeued 0; also
    // when killed at the very next event, 1.5 MiB later: a rehearsal, session 9). The events are the
    // agent's (one per 1/64 of the image), so both steps happen mid-pull however fast the paths are.
    let frozenAt: number | undefined
    let killedAt: number | undefined
    let killing: Promise<void> | undefined
    let fetchEvents = 0
    let r: PullResult
    try {
      r = await pullWithEvents(
        a1,
        'swarm:1',
        out,
        (e) => {
          const got = e.phase === 'fetch' ? (e.bytesFetched ?? 0) : 0
          if (e.phase === 'fetch') fetchEvents++
          if (frozenAt === undefined && got >= 0.1 * size) {
            frozenAt = got
            process.kill(-b1.child.pid!, 'SIGSTOP')
          } else if (frozenAt !== undefined && killing === undefined && got >= frozenAt + 0.25 * size) {
            killedAt = got
            killing = b1.kill()
          }
        },
        240_000,
      )
    } finally {
      // Never leave a frozen agent behind, whatever happened.
      await (killing ?? b1.kill())
    }
    assert.ok(killedAt !== undefined && killedAt < size, `b1 was not killed mid-pull (at ${killedAt})`)
    assert.equal(sha(readFileSync(join(out, 'swarm.img'))), f.sha, 'pulled bytes differ')
    process.stdout.write(
      `      swarm pull: froze b1 at ${((frozenAt ?? 0) / MiB).toFixed(1)} MiB, killed it at ${((killedAt ?? 0) / MiB).toFixed(1)} MiB (${fetchEvents} fetch events); ${JSON.stringify({ bytesFromPeer: r.bytesFromPeer, chunksRequeued: r.chunksRequeued })}\n`,
    )
    assert.equal(r.bytesFetched, size)
    const from = (p: AgentProc) => r.bytesFromPeer[p.peerId] ?? 0
    assert.equal(from(b1) + from(c1) + from(d1), size)
    // No upper bound on b1's share beyond 'not all of it': how much it served before the freeze depends
    // on the paths' speeds (CI, session 8: with the CLI's 500 ms progress lines b1 had served 48 MiB of 96
    // by the line that froze it, and the old bound size/2 failed). What proves the kill was mid-pull is
    // that chunks owed by b1 were asked of the others (chunksRequeued below) and both served.
    assert.ok(from(b1) > 0 && from(b1) < size, `the killed holder served ${from(b1)} B`)
    assert.ok(from(c1) > 0 && from(d1) > 0, 'both surviving holders served')
    assert.ok(r.chunksRequeued > 0, 'chunks in flight from the killed holder were asked of the others')
    assert.deepEqual(r.badPeers, [])
  })
})
