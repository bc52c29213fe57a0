/**
 * A tunnel test rig in one process: N switches (tunnel services) joined by in-memory links, guests
 * booted under QEMU with `-netdev stream` (QEMU the server, the switch the client), and a host TAP
 * port on the first switch moved into a private network namespace, so host tools (busybox ping, the
 * stream client, nc, iperf3) reach the guests through the tunnel without touching the host's network.
 * Everything is torn down by `destroy()`, also after a failure half-way.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { type BootedGuest, bootGuest } from '../../fixtures/guest/qemu.ts'
import {
  deleteNetns,
  type ExecResult,
  execCommand,
  killNetnsProcesses,
  runChecked,
} from '../../fixtures/testnet/netns.ts'
import type { StreamEchoResult } from '../../fixtures/testnet/stream-client.ts'
import type { Link, Overlay } from '../../net/link/interfaces.ts'
import { createLinkSetOverlay, createMemoryLinkPair, type MemoryLinkOptions } from '../../net/link/memory.ts'
import { TUNNEL_MTU } from '../../net/tunnel/interfaces.ts'
import { createWebRtcLink } from '../../net/webrtc/link.ts'
import { createMemorySignalingPair } from '../../net/webrtc/memory-signaling.ts'
import { createTunnelService, type TunnelService } from '../../src/agent/services/tunnel.ts'
import { createLogger, silentLogger } from '../../src/base/log.ts'
import { runStreamClient } from './stream-echo.ts'

export interface RigGuest {
  name: string
  /** Node (switch) the guest runs on. */
  on: string
  ip: string
  mac: string
  memMiB?: number
}

export interface RigOptions {
  nodes: string[]
  guests: RigGuest[]
  /** Subnet prefix, e.g. `10.250.0` (host TAP is .1). */
  subnet: string
  /** Links between the switches: in-memory (default) or werift over loopback, in this process. */
  carrier?: 'memory' | 'webrtc'
  link?: MemoryLinkOptions
  /** Nodes that get a host TAP port, each in its own namespace (default: the first node). */
  tapNodes?: string[]
  debug?: boolean
}

export interface Rig {
  overlay(node: string): Overlay
  /** Namespace of the first TAP (the first tap node). */
  netns: string
  tapIp: string
  /** TAP namespaces and addresses by node. */
  taps: Map<string, { netns: string; ip: string }>
  service(node: string): TunnelService
  guest(name: string): BootedGuest
  /** Runs a command inside a TAP's namespace (default: the first). */
  exec(cmd: string, args: string[], timeoutMs?: number, node?: string): Promise<ExecResult>
  ping(ip: string, count?: number): Promise<{ received: number; avgMs: number | undefined; out: string }>
  streamEcho(ip: string, port: number, durationMs: number): Promise<StreamEchoResult>
  /** Starts the stream client without waiting; resolves with its result at the end. */
  startStreamEcho(ip: string, port: number, durationMs: number): Promise<StreamEchoResult>
  /**
   * Moves a guest's NIC to another switch, as a migration does for the network: the old switch lets
   * go (QEMU's stream server then accepts the new switch's connection), the new one plugs it in and
   * announces the MAC. Resolves when the new switch is connected to QEMU.
   */
  moveNic(guest: string, to: string): Promise<void>
  where(guest: string): string
  destroy(): Promise<void>
}

export async function createRig(o: RigOptions): Promise<Rig> {
  const image = await ensureGuest()
  const id = `${process.pid.toString(36)}${Math.floor(Math.random() * 1e4).toString(36)}`
  const tapNodes = o.tapNodes ?? [o.nodes[0]!]
  const taps = new Map<string, { netns: string; ip: string }>()
  for (const [i, n] of tapNodes.entries())
    taps.set(n, { netns: `mtun-${id}-${n}`, ip: `${o.subnet}.${i + 1}` })
  const netns = taps.get(tapNodes[0]!)!.netns
  const sockets = new Map<string, string>()
  const location = new Map<string, string>()
  const dir = mkdtempSync(join(tmpdir(), 'mesh-tunrig-'))
  const overlays = new Map(o.nodes.map((n) => [n, createLinkSetOverlay(n)]))
  const closers: Array<() => Promise<void> | void> = []
  const services = new Map<string, TunnelService>()
  const guests = new Map<string, BootedGuest>()
  const nsCreated: string[] = []
  const log = o.debug === true ? createLogger({ level: 'debug' }) : silentLogger

  const destroy = async () => {
    await Promise.all([...guests.values()].map((g) => g.kill()))
    guests.clear()
    for (const s of services.values()) await s.stop().catch(() => {})
    services.clear()
    for (const c of closers.splice(0)) await Promise.resolve(c()).catch(() => {})
    for (const ns of nsCreated.splice(0)) {
      await killNetnsProcesses(ns, 500).catch(() => {})
      await deleteNetns(ns).catch(() => {})
    }
    rmSync(dir, { recursive: true, force: true })
  }

  try {
    for (const t of taps.values()) {
      await runChecked('ip', ['netns', 'add', t.netns])
      nsCreated.push(t.netns)
      await runChecked('ip', ['-n', t.netns, 'link', 'set', 'lo', 'up'])
    }
    for (const n of o.nodes) {
      const t = taps.get(n)
      const svc = createTunnelService({
        overlay: overlays.get(n)!.overlay,
        log: log.child(n),
        ...(t !== undefined
          ? { tap: { name: `mt${id}${n}`.slice(0, 15), address: `${t.ip}/24`, netns: t.netns } }
          : {}),
      })
      await svc.start(new AbortController().signal)
      services.set(n, svc)
    }
    for (let i = 0; i < o.nodes.length; i++) {
      for (let j = i + 1; j < o.nodes.length; j++) {
        const [na, nb] = [o.nodes[i]!, o.nodes[j]!]
        let pair: { a: Link; b: Link }
        if (o.carrier === 'webrtc') {
          const sig = createMemorySignalingPair()
          const common = { iceAdditionalHostAddresses: ['127.0.0.1'], iceInterfaceAddress: '127.0.0.1' }
          const [a, b] = await Promise.all([
            createWebRtcLink({ peer: nb, initiator: true, signaling: sig.a, ...common }),
            createWebRtcLink({ peer: na, initiator: false, signaling: sig.b, ...common }),
          ])
          closers.push(
            () => a.destroy(),
            () => b.destroy(),
          )
          pair = { a, b }
        } else {
          pair = createMemoryLinkPair(na, nb, o.link)
          closers.push(() => pair.a.close())
        }
        overlays.get(na)!.add(pair.a)
        overlays.get(nb)!.add(pair.b)
      }
    }
    for (const g of o.guests) {
      const sock = join(dir, `${g.name}.net`)
      const booted = bootGuest({
        image,
        name: g.name,
        ip: `${g.ip}/24`,
        mac: g.mac,
        mtu: TUNNEL_MTU,
        memMiB: g.memMiB ?? 128,
        netdev: { type: 'stream', path: sock },
      })
      guests.set(g.name, booted)
      sockets.set(g.name, sock)
      location.set(g.name, g.on)
      services.get(g.on)!.switch.attachVm(g.mac, sock)
    }
    await Promise.all([...guests.values()].map((g) => g.waitReady({ timeoutMs: 120_000 })))
    for (const g of o.guests) services.get(g.on)!.switch.announce(g.mac)
  } catch (err) {
    await destroy()
    throw err
  }

  const exec = (cmd: string, args: string[], timeoutMs = 60_000, node?: string) =>
    execCommand('ip', ['netns', 'exec', node === undefined ? netns : taps.get(node)!.netns, cmd, ...args], {
      timeoutMs,
    })
  const startStreamEcho = (ip: string, port: number, durationMs: number) =>
    runStreamClient(netns, ip, port, durationMs, durationMs + 60_000).result
  const macOf = new Map(o.guests.map((g) => [g.name, g.mac]))

  return {
    overlay: (n) => overlays.get(n)!.overlay,
    netns,
    tapIp: taps.get(tapNodes[0]!)!.ip,
    taps,
    service: (n) => services.get(n)!,
    guest: (n) => guests.get(n)!,
    exec,
    async ping(ip, count = 3) {
      const r = await exec('busybox', ['ping', '-c', String(count), '-W', '5', ip], 60_000)
      const received = Number(/(\d+) packets received/.exec(r.stdout)?.[1] ?? 0)
      const avg = /min\/avg\/max = [\d.]+\/([\d.]+)\//.exec(r.stdout)?.[1]
      return { received, avgMs: avg === undefined ? undefined : Number(avg), out: r.stdout + r.stderr }
    },
    streamEcho: startStreamEcho,
    startStreamEcho,
    async moveNic(guest, to) {
      const from = location.get(guest)!
      const mac = macOf.get(guest)!
      await services.get(from)!.switch.detachVm(mac, { to })
      const sw = services.get(to)!.switch
      sw.attachVm(mac, sockets.get(guest)!, { from })
      sw.announce(mac)
      location.set(guest, to)
      const t0 = Date.now()
      while (sw.status().ports.find((p) => p.id === `vm:${mac}`)?.connected !== true) {
        if (Date.now() - t0 > 10_000) throw new Error(`switch ${to} did not connect to ${guest}'s socket`)
        await new Promise((r) => setTimeout(r, 5))
      }
    },
    where: (guest) => location.get(guest)!,
    destroy,
  }
}
