/**
 * The chunk bench between agents in NAT'd clouds (real `mesh agent` processes in network namespaces,
 * driven through the CLI). Topology: holder clouds c1..c3 (hosts h1..h3 cone NAT, each host with one TCP port
 * forwarded on its router, as a cloud VM with a public IP and an open port has) and a puller cloud `p` (hosts p1, p2)
 * behind cone NAT with nothing forwarded. The links are WebRTC (srflx) through the NATs; with direct
 * paths on (the default) the pullers' links' bulk channels then move to a direct TCP connection to the
 * holders' public ports. `--no-direct` keeps everything on WebRTC.
 *
 * In the same run, from the puller to holder 1: the overlay link's raw rate (`mesh bench`, WebRTC
 * control channel) and a plain libp2p stream's (`mesh bench --over libp2p`, tcp+noise+yamux).
 */
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { writeTestFile, writeVariant } from '../../net/chunks/testing.ts'
import { type AgentProc, createTestnet, lastJson, type Testnet } from '../helpers/testnet.ts'

export interface CloudChunksOptions {
  mib: number
  engine: 'werift' | 'libdatachannel'
  direct: boolean
  log: (line: string) => void
}

export interface CloudChunksResult {
  fetchMBps: number
  fetch3MBps: number
  linkMBps: number
  libp2pTcpMBps: number
  dedupWireRatio: number
  engine: string
  /** How the pulls' bulk traffic went: `direct-tcp`, or `webrtc-<ICE type>`. */
  path: string
  fileMiB: number
  libp2pPath: string
}

const PORT = 4101
const round = (x: number, d = 2) => Math.round(x * 10 ** d) / 10 ** d

interface PullResult {
  bytesFetched: number
  bytesSkipped: number
  elapsedMs: number
  from: string[]
}

async function ok(a: AgentProc, args: string[], timeoutMs = 900_000): Promise<string> {
  const r = await a.mesh(args, { timeoutMs })
  if (r.code !== 0)
    throw new Error(`${a.name}: mesh ${args.join(' ')} failed (${r.code}): ${r.stderr.slice(-800)}`)
  return r.stdout
}

export async function chunksAcrossClouds(opts: CloudChunksOptions): Promise<CloudChunksResult> {
  const { log } = opts
  const dir = await mkdtemp(join(tmpdir(), 'bench-chunks-clouds-'))
  let net: Testnet | undefined
  try {
    log(`building 4 NAT'd clouds (engine ${opts.engine}, direct paths ${opts.direct ? 'on' : 'off'})`)
    net = await createTestnet({
      clouds: [
        { name: 'c1', hosts: ['h1'] },
        { name: 'c2', hosts: ['h2'] },
        { name: 'c3', hosts: ['h3'] },
        { name: 'p', hosts: ['p1', 'p2'] },
      ],
      noJoin: true,
      agentArgs: ['--engine', opts.engine, ...(opts.direct ? [] : ['--no-direct'])],
    })
    const holders: AgentProc[] = []
    for (const c of net.topo.clouds.filter((c) => c.name !== 'p')) {
      const pub = await c.forwardTcp(PORT)
      holders.push(
        await net.join(c.hosts[0]!.name, {
          args: ['--listen', `/ip4/0.0.0.0/tcp/${PORT}`, '--announce', pub],
        }),
      )
    }
    const p1 = await net.join('p1')
    const [h1, h2, h3] = holders as [AgentProc, AgentProc, AgentProc]
    await net.waitForFullMesh(['h1', 'p1'], 120_000)

    const size = opts.mib * 1024 * 1024
    const v1 = join(dir, 'v1.bin')
    const v2 = join(dir, 'v2.bin')
    await writeTestFile(v1, size)
    await writeVariant(v1, v2, 0.1)
    await ok(h1, ['image', 'push', v1, '--name', 'bench:v1', '--json'])

    // Let the direct path settle (it is negotiated after the link is up).
    const pathOf = async (from: AgentProc, to: string) => {
      const rows = (await from.json<{ peers: { name: string; path?: string; direct?: string }[] }>(['peers']))
        .peers
      const r = rows.find((x) => x.name === to)
      return r?.direct !== undefined ? 'direct-tcp' : `webrtc-${r?.path ?? 'none'}`
    }
    const deadline = Date.now() + 15_000
    let path = await pathOf(p1, 'h1')
    while (opts.direct && path !== 'direct-tcp' && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500))
      path = await pathOf(p1, 'h1')
    }
    log(`p1 → h1 bulk path: ${path}`)

    const pull1 = lastJson<PullResult>(await ok(p1, ['image', 'pull', 'bench:v1', '--json']))
    const fetchMBps = size / 1e6 / (pull1.elapsedMs / 1000)
    log(`fetch ${opts.mib} MiB from 1 holder: ${fetchMBps.toFixed(1)} MB/s (${pull1.elapsedMs} ms)`)

    const link = lastJson<{ mbps: number }>(await ok(p1, ['bench', 'h1', '--mib', '32', '--json']))
    log(`overlay link (WebRTC control channel): ${link.mbps.toFixed(1)} MB/s`)
    const tcp = lastJson<{ mbps: number; path: string }>(
      await ok(p1, ['bench', 'h1', '--over', 'libp2p', '--mib', String(Math.min(opts.mib, 256)), '--json']),
    )
    log(`plain libp2p stream: ${tcp.mbps.toFixed(1)} MB/s (${tcp.path})`)

    // v2 shares 90% of its chunks with v1, which p1 now holds.
    await ok(h1, ['image', 'push', v2, '--name', 'bench:v2', '--json'])
    const pull2 = lastJson<PullResult>(await ok(p1, ['image', 'pull', 'bench:v2', '--json']))
    const dedupWireRatio = pull2.bytesFetched / (await stat(v2)).size
    log(
      `v2 pull: ${(pull2.bytesFetched / 2 ** 20).toFixed(1)} MiB fetched, ratio ${dedupWireRatio.toFixed(3)}`,
    )

    // Three holders, and a fresh puller (p1 holds v1 now and is stopped, so it is not a fourth).
    await p1.kill()
    // h2 and h3 pull it (a separate push would make a different image record: its own creation time).
    await net.waitForFullMesh(['h1', 'h2', 'h3'], 120_000)
    for (const h of [h2, h3]) await ok(h, ['image', 'pull', 'bench:v1', '--json'])
    const p2 = await net.join('p2')
    await net.waitForFullMesh(['h1', 'h2', 'h3', 'p2'], 120_000)
    const settle = Date.now() + 15_000
    while (opts.direct && Date.now() < settle) {
      const paths = await Promise.all(['h1', 'h2', 'h3'].map((h) => pathOf(p2, h)))
      if (paths.every((x) => x === 'direct-tcp')) break
      await new Promise((r) => setTimeout(r, 500))
    }
    const pull3 = lastJson<PullResult>(await ok(p2, ['image', 'pull', 'bench:v1', '--json']))
    const fetch3MBps = size / 1e6 / (pull3.elapsedMs / 1000)
    log(`fetch from 3 holders: ${fetch3MBps.toFixed(1)} MB/s (from ${pull3.from.length} member(s))`)

    return {
      fetchMBps: round(fetchMBps),
      fetch3MBps: round(fetch3MBps),
      linkMBps: round(link.mbps),
      libp2pTcpMBps: round(tcp.mbps),
      dedupWireRatio: round(dedupWireRatio, 4),
      engine: opts.engine,
      path,
      libp2pPath: tcp.path,
      fileMiB: opts.mib,
    }
  } finally {
    await net?.destroy()
    await rm(dir, { recursive: true, force: true })
  }
}
