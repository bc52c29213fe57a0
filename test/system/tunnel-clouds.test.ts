import assert from 'node:assert/strict'
import type { ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { ECHO_PORT } from '../../fixtures/guest/ports.ts'
import { createClouds, type Topology, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import type { StreamEchoResult } from '../../fixtures/testnet/stream-client.ts'
import { startRendezvous } from '../bench/link.ts'
import type { TunnelNodeConfig } from '../helpers/tunnel-node.ts'

const ROOT = resolve(fileURLToPath(new URL('../..', import.meta.url)))
const NODE_SCRIPT = join(ROOT, 'test/helpers/tunnel-node.ts')
const CLIENT = join(ROOT, 'fixtures/testnet/stream-client.ts')

/**
 * Two members in two different cone-NAT'd clouds, each running a switch in its own process with a
 * guest under QEMU; the members' link is werift through both NATs (STUN on the internet host). The
 * member in cloud b also has a host TAP port (in its host namespace), from which the test pings both
 * guests and streams TCP data to the guest in cloud a.
 */
describe('tunnel across NAT clouds (two members, two guests, werift)', function () {
  this.timeout(400_000)
  let topo: Topology | undefined
  let dir: string | undefined
  const nodes: ChildProcess[] = []

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['qemu-system-x86_64', 'socat', 'busybox', 'ip'] })
    await ensureGuest()
    dir = mkdtempSync(join(tmpdir(), 'mesh-tuncloud-'))
    topo = await createClouds({
      clouds: [
        { name: 'a', nat: 'cone' },
        { name: 'b', nat: 'cone' },
      ],
      internetHosts: ['boot'],
    })
    const boot = topo.host('boot')
    const { relayPort, stunPort } = await startRendezvous(boot)
    const common = {
      relay: { host: boot.ip, port: relayPort },
      iceServers: [{ urls: `stun:${boot.ip}:${stunPort}` }],
    }
    const cfgs: Array<[string, TunnelNodeConfig]> = [
      [
        'a1',
        {
          name: 'a1',
          ...common,
          links: [{ peer: 'b1', initiator: true, room: 'ab' }],
          guest: { name: 'ga', ip: '10.252.0.11', mac: '52:54:00:fc:00:11' },
        },
      ],
      [
        'b1',
        {
          name: 'b1',
          ...common,
          links: [{ peer: 'a1', initiator: false, room: 'ab' }],
          tap: { name: 'mesh0', address: '10.252.0.1/24' },
          guest: { name: 'gb', ip: '10.252.0.12', mac: '52:54:00:fc:00:12' },
        },
      ],
    ]
    for (const [host, cfg] of cfgs) {
      const file = join(dir, `${host}.json`)
      writeFileSync(file, JSON.stringify({ ...cfg, dir }))
      nodes.push(
        topo.host(host).spawn(process.execPath, ['--import', 'tsx', NODE_SCRIPT, file], {
          cwd: ROOT,
          stdio: ['pipe', 'pipe', 'pipe'],
        }),
      )
    }
    await Promise.all(nodes.map((n) => waitForLine(n, /"ev":"started"/, 60_000)))
    // The answering side joins its signaling room first, then the offering side.
    nodes[1]!.stdin!.write('{"cmd":"connect"}\n')
    await new Promise((r) => setTimeout(r, 500))
    nodes[0]!.stdin!.write('{"cmd":"connect"}\n')
    await Promise.all(nodes.map((n) => waitForLine(n, /"ev":"open"/, 90_000)))
    await Promise.all(nodes.map((n) => waitForLine(n, /"ev":"ready"/, 240_000)))
  })

  after(async () => {
    // Ask each member to stop its guest and exit; the topology's teardown kills whatever is left.
    await Promise.all(
      nodes.map(
        (n) =>
          new Promise<void>((r) => {
            if (n.exitCode !== null || n.signalCode !== null) return r()
            const t = setTimeout(r, 10_000)
            n.once('exit', () => {
              clearTimeout(t)
              r()
            })
            n.stdin?.end()
          }),
      ),
    )
    await topo?.destroy()
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true })
  })

  it('cloud b (TAP) reaches the guest in cloud a through both NATs, and its own guest: ping and TCP data', async () => {
    const b1 = topo!.host('b1')
    for (const ip of ['10.252.0.12', '10.252.0.11']) {
      const r = await b1.exec('busybox', ['ping', '-c', '3', '-W', '5', ip], { timeoutMs: 60_000 })
      assert.match(r.stdout, /3 packets received/, `ping ${ip}: ${r.stdout}${r.stderr}`)
    }
    const r = await b1.exec(
      process.execPath,
      ['--import', 'tsx', CLIENT, '10.252.0.11', String(ECHO_PORT), '3000'],
      {
        timeoutMs: 90_000,
      },
    )
    const res = JSON.parse(r.stdout.trim().split('\n').at(-1) ?? '{}') as StreamEchoResult
    assert.equal(res.connected, true, r.stderr)
    assert.equal(res.resets, 0, JSON.stringify(res))
    assert.equal(res.mismatches, 0)
    assert.ok(res.bytesSent > 50_000, `sent ${res.bytesSent}`)
    assert.equal(res.bytesEchoed, res.bytesSent)
  })
})
