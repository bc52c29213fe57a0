/**
 * A tunnel member in its own process, for cross-cloud tests (one per host namespace): WebRTC links
 * (werift, signaling through the TCP relay, STUN for NAT traversal), the tunnel service with an
 * optional host TAP port, and optionally one test guest under QEMU plugged into the switch.
 *
 *   node --import tsx test/helpers/tunnel-node.ts CONFIG.json
 *
 * Prints JSON lines: {"ev":"started"}; on {"cmd":"connect"} it opens its links, {"ev":"open"} once every link is up, {"ev":"ready","guest":…} once the guest
 * booted (or at once without one), {"ev":"status",…} on {"cmd":"status"}. {"cmd":"exit"}, stdin EOF or
 * SIGTERM stop the guest and the service and exit.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { type BootedGuest, bootGuest } from '../../fixtures/guest/qemu.ts'
import { createLinkSetOverlay } from '../../net/link/memory.ts'
import { TUNNEL_MTU } from '../../net/tunnel/interfaces.ts'
import type { IceServer } from '../../net/webrtc/interfaces.ts'
import { createWebRtcLink, type WebRtcLink } from '../../net/webrtc/link.ts'
import { createTunnelService } from '../../src/agent/services/tunnel.ts'
import { createLogger } from '../../src/base/log.ts'
import { connectTcpSignaling, type TcpSignaling } from './webrtc-signal-relay.ts'

export interface TunnelNodeConfig {
  name: string
  relay: { host: string; port: number }
  links: { peer: string; initiator: boolean; room: string }[]
  iceServers?: IceServer[]
  tap?: { name: string; address: string }
  guest?: { name: string; ip: string; mac: string }
  /** Parent of this node's working directory (the guest's socket); default the system temp dir. */
  dir?: string
}

const cfg = JSON.parse(readFileSync(process.argv[2] ?? '', 'utf8')) as TunnelNodeConfig
const out = (o: Record<string, unknown>): void => {
  process.stdout.write(`${JSON.stringify(o)}\n`)
}
const log = createLogger({ level: 'info', component: cfg.name })
const { overlay, add } = createLinkSetOverlay(cfg.name)
const svc = createTunnelService({ overlay, log, ...(cfg.tap ? { tap: cfg.tap } : {}) })
const dir = mkdtempSync(join(cfg.dir ?? tmpdir(), 'mesh-tunnode-'))
const sigs: TcpSignaling[] = []
const links: WebRtcLink[] = []
let guest: BootedGuest | undefined
let stopping: Promise<void> | undefined

const stop = (): Promise<void> => {
  stopping ??= (async () => {
    await guest?.kill()
    await svc.stop().catch(() => {})
    for (const l of links) await l.destroy().catch(() => {})
    for (const s of sigs) s.close()
    rmSync(dir, { recursive: true, force: true })
    process.exit(0)
  })()
  return stopping
}
process.once('SIGTERM', () => void stop())

await svc.start(new AbortController().signal)
out({ ev: 'started' })

async function connectAll(): Promise<void> {
  await Promise.all(
    cfg.links.map(async (l) => {
      const sig = await connectTcpSignaling(cfg.relay.host, cfg.relay.port, l.room)
      sigs.push(sig)
      const link = await createWebRtcLink({
        peer: l.peer,
        initiator: l.initiator,
        signaling: sig,
        iceServers: cfg.iceServers ?? [],
      })
      links.push(link)
      add(link)
    }),
  )
  out({ ev: 'open', paths: overlay.links().map((l) => ({ peer: l.peer, path: l.path.type })) })
}

async function startGuest(): Promise<void> {
  if (cfg.guest === undefined) {
    out({ ev: 'ready' })
    return
  }
  const g = cfg.guest
  const image = await ensureGuest()
  const sock = join(dir, 'guest.net')
  guest = bootGuest({
    image,
    name: g.name,
    ip: `${g.ip}/24`,
    mac: g.mac,
    mtu: TUNNEL_MTU,
    memMiB: 128,
    netdev: { type: 'stream', path: sock },
  })
  svc.switch.attachVm(g.mac, sock)
  const ready = await guest.waitReady({ timeoutMs: 180_000 })
  svc.switch.announce(g.mac)
  out({ ev: 'ready', guest: ready })
}

const fail = (err: unknown) => {
  out({ ev: 'error', message: err instanceof Error ? err.message : String(err) })
  void stop()
}

const rl = createInterface({ input: process.stdin })
rl.on('line', (line) => {
  const c = JSON.parse(line) as { cmd: string }
  // Links open only when asked: the test starts every member first, so no offer goes to an empty room.
  if (c.cmd === 'connect') connectAll().then(startGuest).catch(fail)
  else if (c.cmd === 'status') out({ ev: 'status', ...svc.status() })
  else if (c.cmd === 'exit') void stop()
})
rl.on('close', () => void stop())
