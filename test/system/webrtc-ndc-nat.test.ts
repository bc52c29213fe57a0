/**
 * The libdatachannel engine (net/webrtc/ndc) across real NATs (clouds fixture), alone and paired with a
 * werift end: one link end per host namespace, each its own Node process (test/helpers/webrtc-peer.ts
 * with `engine`); STUN responder, signaling relay and coturn on the internet host. Same rig as
 * webrtc-nat.test.ts (werift only).
 */
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createClouds, type Host, type Topology, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { type Coturn, startCoturn } from '../../fixtures/testnet/coturn.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { PEER_SCRIPT, PeerProcess, peerConfigDir, RELAY_SCRIPT } from '../helpers/webrtc-peer-process.ts'

type Engine = 'werift' | 'libdatachannel'
const NODE = process.execPath
const ROOT = fileURLToPath(new URL('../..', import.meta.url))
const STUN_SCRIPT = join(ROOT, 'net/stun/server.ts')
const RELAY_PORT = 7000
const STUN_PORT = 3478
const TURN_PORT = 3479

describe('webrtc links across NATs (clouds), libdatachannel engine', function () {
  this.timeout(90_000)
  let topo: Topology | undefined
  let cfgs: ReturnType<typeof peerConfigDir> | undefined
  let coturn: Coturn | undefined
  let boot: Host
  const peers: PeerProcess[] = []
  let room = 0

  before(async function () {
    this.timeout(120_000)
    requireOrSkip(this, { root: true, commands: ['ip', 'turnserver'] })
    topo = await createClouds({
      clouds: [
        { name: 'a', nat: 'cone' },
        { name: 'b', nat: 'cone' },
        { name: 's', nat: 'symmetric' },
      ],
      internetHosts: ['boot'],
      killGraceMs: 500,
    })
    cfgs = peerConfigDir()
    boot = topo.host('boot')
    const relay = boot.spawn(NODE, ['--import', 'tsx', RELAY_SCRIPT, boot.ip, String(RELAY_PORT)], {
      cwd: ROOT,
    })
    const stun = boot.spawn(NODE, ['--import', 'tsx', STUN_SCRIPT, boot.ip, String(STUN_PORT)], { cwd: ROOT })
    coturn = await startCoturn(boot, { port: TURN_PORT })
    await waitForLine(relay, /"listening"/, 30_000)
    await waitForLine(stun, /"listening"/, 30_000)
  })

  after(async () => {
    for (const p of peers) p.child.kill('SIGKILL')
    await topo?.destroy()
    cfgs?.remove()
    coturn?.cleanup()
  })

  afterEach(() => {
    for (const p of peers.splice(0)) p.child.kill('SIGKILL')
  })

  function startPair(
    hostA: string,
    hostB: string,
    opts: { turn?: boolean; deadAfterMs?: number; engines: [Engine, Engine] },
  ): [PeerProcess, PeerProcess] {
    const t = topo!
    const r = `r${++room}`
    const iceServers = [
      { urls: `stun:${boot.ip}:${STUN_PORT}` },
      ...(opts.turn
        ? [{ urls: coturn!.url, username: coturn!.username, credential: coturn!.credential }]
        : []),
    ]
    const pair = [
      [hostA, hostB, true],
      [hostB, hostA, false],
    ].map(([name, peer, initiator], i) => {
      const path = cfgs!.write(`${r}-${name}`, {
        name: name as string,
        peer: peer as string,
        initiator: initiator as boolean,
        relay: { host: boot.ip, port: RELAY_PORT },
        room: r,
        iceServers,
        engine: opts.engines[i]!,
        ...(opts.deadAfterMs === undefined ? {} : { deadAfterMs: opts.deadAfterMs }),
      })
      const child = t
        .host(name as string)
        .spawn(NODE, ['--import', 'tsx', PEER_SCRIPT, path], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] })
      const p = new PeerProcess(child)
      peers.push(p)
      return p
    }) as [PeerProcess, PeerProcess]
    return pair
  }

  async function connect(a: PeerProcess, b: PeerProcess, room?: string) {
    a.send({ cmd: 'connect', ...(room ? { room } : {}) })
    b.send({ cmd: 'connect', ...(room ? { room } : {}) })
    const [oa, ob] = await Promise.all([a.next('open', 45_000), b.next('open', 45_000)])
    return { a: oa, b: ob }
  }

  async function bothWays(a: PeerProcess, b: PeerProcess, bytes: number) {
    a.send({ cmd: 'send', bytes })
    const ab = await b.next('received', 45_000)
    b.send({ cmd: 'send', bytes })
    const ba = await a.next('received', 45_000)
    assert.equal(ab.ok, true, 'a→b data intact')
    assert.equal(ba.ok, true, 'b→a data intact')
    assert.equal(ab.bytes, bytes)
    assert.equal(ba.bytes, bytes)
    return { ab: Number(ab.mbps), ba: Number(ba.mbps) }
  }

  for (const engines of [
    ['libdatachannel', 'libdatachannel'],
    ['werift', 'libdatachannel'],
    ['libdatachannel', 'werift'],
  ] as [Engine, Engine][]) {
    it(`cone ↔ cone, ${engines.join(' ↔ ')}: a direct path, data both ways`, async () => {
      const [a, b] = startPair('a1', 'b1', { engines })
      const open = await connect(a, b)
      const path = open.a.path as { type: string }
      assert.ok(
        ['srflx', 'prflx', 'host'].includes(path.type),
        `direct path expected, got ${JSON.stringify(path)}`,
      )
      assert.ok(!JSON.stringify(open.b.path).includes('relay'))
      const mbps = await bothWays(a, b, 4 * 1024 * 1024)
      process.stdout.write(
        `      ${engines.join('↔')}: path ${JSON.stringify(path)}, setup ${open.a.setupMs} ms, ` +
          `${mbps.ab.toFixed(2)} / ${mbps.ba.toFixed(2)} MB/s\n`,
      )
    })
  }

  for (const engines of [
    ['libdatachannel', 'libdatachannel'],
    ['libdatachannel', 'werift'],
  ] as [Engine, Engine][]) {
    it(`symmetric ↔ cone, ${engines.join(' ↔ ')}: relayed through TURN, data both ways`, async () => {
      const [s, a] = startPair('s1', 'a1', { turn: true, engines })
      const open = await connect(s, a)
      assert.equal((open.a.path as { type: string }).type, 'relay', JSON.stringify(open.a.path))
      const mbps = await bothWays(s, a, 1024 * 1024)
      process.stdout.write(
        `      symmetric↔cone ${engines.join('↔')}: path ${JSON.stringify(open.a.path)}, ` +
          `${mbps.ab.toFixed(2)} / ${mbps.ba.toFixed(2)} MB/s\n`,
      )
    })
  }
})
