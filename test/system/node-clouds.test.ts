/**
 * Mesh nodes as separate processes, each in its own network namespace (fixtures/testnet/clouds.ts): a
 * bootstrap on the "internet" (relay + STUN), one member in each of two clouds behind cone NATs.
 *
 * This file is also the child process: run with MESH_NODE_CHILD=<json config>, it starts one node and
 * speaks a line protocol on stdio (commands in, events out), so the parent drives every node alike.
 */
import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import type { MeshNode } from '../../net/interfaces.ts'
import { createNetwork, loadNetworkKey, saveNetworkKey } from '../../net/membership/network.ts'
import { createMeshNode } from '../../net/node.ts'
import { createLogger } from '../../src/base/log.ts'

interface ChildConfig {
  stateDir: string
  name: string
  listen: string[]
  announce?: string[]
  networkKeyPath?: string
  invite?: string
  relay?: boolean
  stunPort?: number
  stun?: string
}

async function child(cfg: ChildConfig): Promise<void> {
  const out = (line: string) => process.stdout.write(`${line}\n`)
  const node: MeshNode = createMeshNode({
    stateDir: cfg.stateDir,
    name: cfg.name,
    listen: cfg.listen,
    ...(cfg.announce ? { announce: cfg.announce } : {}),
    ...(cfg.networkKeyPath ? { networkKey: await loadNetworkKey(cfg.networkKeyPath) } : {}),
    ...(cfg.invite ? { invite: cfg.invite } : {}),
    ...(cfg.relay
      ? { bootstrapRole: { relay: true, ...(cfg.stunPort ? { stunPort: cfg.stunPort } : {}) } }
      : {}),
    ...(cfg.stun ? { iceServers: [{ urls: cfg.stun }] } : {}),
    timing: { tickMs: 300 },
    log: createLogger({ level: 'debug', sink: (l) => out(`LOG ${l}`) }),
  })
  node.on('link-up', ({ peer, path }) => {
    out(`LINK-UP ${peer} ${path}`)
    node.overlay
      .link(peer)
      ?.channel('control')
      .onMessage((m) => out(`MSG ${peer} ${Buffer.from(m).toString()}`))
  })
  node.on('link-down', ({ peer }) => out(`LINK-DOWN ${peer}`))
  node.on('refused', ({ peer, code }) => out(`REFUSED ${peer} ${code}`))
  await node.start()
  out(`READY ${node.peerId}`)
  const rl = createInterface({ input: process.stdin })
  rl.on('line', async (line) => {
    const [cmd, a, ...rest] = line.trim().split(' ')
    try {
      if (cmd === 'invite') out(`INVITE ${await node.invite({ ttlMs: 120_000 })}`)
      else if (cmd === 'send')
        node.overlay
          .link(a!)
          ?.channel('control')
          .send(Buffer.from(rest.join(' ')))
      else if (cmd === 'revoke') {
        await node.revoke(a!)
        out(`REVOKED ${a}`)
      } else if (cmd === 'members') out(`MEMBERS ${JSON.stringify(node.members())}`)
    } catch (err) {
      out(`ERROR ${(err as Error).name} ${(err as Error).message}`)
    }
  })
  const stop = () => {
    void node.stop().finally(() => process.exit(0))
  }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
  rl.on('close', stop)
}

if (process.env.MESH_NODE_CHILD !== undefined) {
  await child(JSON.parse(process.env.MESH_NODE_CHILD) as ChildConfig)
} else {
  const { createClouds, outputLines, waitForLine } = await import('../../fixtures/testnet/clouds.ts')
  const { requireOrSkip } = await import('../../fixtures/testnet/prereq.ts')
  type Topology = Awaited<ReturnType<typeof createClouds>>

  describe('mesh node: one process per namespace across two cone NATs', function () {
    this.timeout(240_000)
    let topo: Topology | undefined
    let dir = ''
    const procs: ChildProcess[] = []

    before(async function () {
      requireOrSkip(this, { root: true, commands: ['ip'] })
      dir = await mkdtemp(join(tmpdir(), 'mesh-clouds-'))
      topo = await createClouds({
        clouds: [
          { name: 'a', nat: 'cone', hosts: 1 },
          { name: 'b', nat: 'cone', hosts: 1 },
        ],
        internetHosts: ['boot'],
      })
    })

    after(async () => {
      for (const p of procs) p.stdin?.end()
      await topo?.destroy()
      if (dir !== '') await rm(dir, { recursive: true, force: true })
    })

    function spawnNode(host: string, cfg: ChildConfig): ChildProcess {
      const p = topo!
        .host(host)
        .spawn(process.execPath, ['--import', 'tsx', 'test/system/node-clouds.test.ts'], {
          cwd: process.cwd(),
          env: { ...process.env, MESH_NODE_CHILD: JSON.stringify(cfg) },
          stdio: ['pipe', 'pipe', 'pipe'],
        })
      procs.push(p)
      return p
    }

    it('members behind NAT join through the bootstrap, get direct links to it and to each other, and revocation propagates', async () => {
      const t = topo!
      const bootIp = t.host('boot').ip
      const key = await createNetwork('cloudnet')
      await saveNetworkKey(join(dir, 'net.key'), key)
      const stun = `stun:${bootIp}:3478`
      const boot = spawnNode('boot', {
        stateDir: join(dir, 'boot'),
        name: 'boot',
        listen: ['/ip4/0.0.0.0/tcp/4001'],
        announce: [`/ip4/${bootIp}/tcp/4001`],
        networkKeyPath: join(dir, 'net.key'),
        relay: true,
        stunPort: 3478,
        stun,
      })
      await waitForLine(boot, /^READY /, 60_000)
      // waitForLine matches any line since the start, so count INVITE lines to get a fresh one.
      let invites = 0
      const invite = async () => {
        boot.stdin!.write('invite\n')
        invites++
        const want = invites
        const end = Date.now() + 20_000
        for (;;) {
          const got = outputLines(boot).filter((l) => l.startsWith('INVITE '))
          if (got.length >= want) return got[want - 1]!.slice('INVITE '.length).trim()
          if (Date.now() > end) throw new Error('no invite from the bootstrap')
          await new Promise((r) => setTimeout(r, 100))
        }
      }
      const a = spawnNode(t.cloud('a').hosts[0]!.name, {
        stateDir: join(dir, 'a'),
        name: 'a',
        listen: ['/ip4/0.0.0.0/tcp/4001'],
        invite: await invite(),
        stun,
      })
      const aId = (await waitForLine(a, /^READY (\S+)/, 60_000))[1]!
      const b = spawnNode(t.cloud('b').hosts[0]!.name, {
        stateDir: join(dir, 'b'),
        name: 'b',
        listen: ['/ip4/0.0.0.0/tcp/4001'],
        invite: await invite(),
        stun,
      })
      const bId = (await waitForLine(b, /^READY (\S+)/, 60_000))[1]!
      // Both members get a link to the bootstrap (which is on the internet) and data flows both ways.
      const bootId = (await waitForLine(boot, /^READY (\S+)/, 1000))[1]!
      const path = (await waitForLine(a, new RegExp(`^LINK-UP ${bootId} (\\S+)`), 60_000))[1]!
      assert.ok(['host', 'srflx', 'prflx'].includes(path), `a-boot link path ${path}`)
      await waitForLine(b, new RegExp(`^LINK-UP ${bootId} `), 60_000)
      a.stdin!.write(`send ${bootId} hello from a\n`)
      boot.stdin!.write(`send ${aId} hello from boot\n`)
      await waitForLine(boot, new RegExp(`^MSG ${aId} hello from a$`), 20_000)
      await waitForLine(a, new RegExp(`^MSG ${bootId} hello from boot$`), 20_000)
      // The two NAT'd members: libp2p through the bootstrap's relay, WebRTC signaled over it, then a
      // direct (hole-punched) link.
      const ab = (await waitForLine(a, new RegExp(`^LINK-UP ${bId} (\\S+)`), 90_000))[1]!
      await waitForLine(b, new RegExp(`^LINK-UP ${aId} `), 30_000)
      assert.ok(['srflx', 'prflx'].includes(ab), `a-b path ${ab}`)
      a.stdin!.write(`send ${bId} hello b\n`)
      b.stdin!.write(`send ${aId} hello a\n`)
      await waitForLine(b, new RegExp(`^MSG ${aId} hello b$`), 20_000)
      await waitForLine(a, new RegExp(`^MSG ${bId} hello a$`), 20_000)
      // Revocation: the bootstrap closes its link to a at once, b learns it by gossip and closes its own.
      boot.stdin!.write(`revoke ${aId}\n`)
      await waitForLine(boot, new RegExp(`^LINK-DOWN ${aId}`), 30_000)
      await waitForLine(b, new RegExp(`^LINK-DOWN ${aId}`), 30_000)
      await waitForLine(a, new RegExp(`^LINK-DOWN ${bootId}`), 30_000)
    })
  })
}
