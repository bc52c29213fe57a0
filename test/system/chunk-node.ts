/**
 * A chunk node in its own process: a chunk store + ChunkService over WebRTC links (werift), driven by
 * JSON lines on stdin, reporting JSON lines on stdout. Used by the chunks benchmark (two or four
 * processes) and usable by cross-cloud tests (one per host namespace).
 *
 *   node --import tsx test/system/chunk-node.ts CONFIG.json
 *
 * CONFIG: { name, store: DIR, relay: {host, port}, links: [{peer, initiator, room}], iceServers?,
 *           iceAdditionalHostAddresses? }
 * Commands: {"cmd":"connect","peers"?:[…]}                 opens the configured links (or those to peers)
 *           {"cmd":"seed","file":F,"mib"?:N}               (writes N MiB of random data to F, then)
 *                                                          imports F, pins it → {"ev":"seeded","id","size"}
 *           {"cmd":"variant","src":F,"file":G,"fraction":x} G = F with x of its chunks rewritten, seeded
 *           {"cmd":"fetch","id":ID,"peers"?:[…],"file"?:F} → {"ev":"progress","bytesFetched","peers"}…,
 *                                                          {"ev":"fetched",…FetchResult,"mbps","wireIn","wireOut"}
 *           {"cmd":"stats"} → {"ev":"stats",…}   {"cmd":"exit"}
 */
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { createChunkService } from '../../net/chunks/exchange.ts'
import { buildManifest } from '../../net/chunks/manifest.ts'
import { openChunkStore } from '../../net/chunks/store.ts'
import { writeTestFile, writeVariant } from '../../net/chunks/testing.ts'
import { createLinkSetOverlay } from '../../net/link/memory.ts'
import type { IceServer } from '../../net/webrtc/interfaces.ts'
import { createWebRtcLink } from '../../net/webrtc/link.ts'
import { createLogger } from '../../src/base/log.ts'
import { connectTcpSignaling, type TcpSignaling } from '../helpers/webrtc-signal-relay.ts'

export interface ChunkNodeConfig {
  name: string
  store: string
  relay: { host: string; port: number }
  links: { peer: string; initiator: boolean; room: string }[]
  iceServers?: IceServer[]
  iceAdditionalHostAddresses?: string[]
  /** ChunkService maxMessageBytes (default: the link limit). */
  maxMessageBytes?: number
}

const cfg = JSON.parse(readFileSync(process.argv[2] ?? '', 'utf8')) as ChunkNodeConfig
const out = (o: Record<string, unknown>): void => {
  process.stdout.write(`${JSON.stringify(o)}\n`)
}
const MiB = 1024 * 1024

const store = await openChunkStore({ dir: cfg.store })
const { overlay, add } = createLinkSetOverlay(cfg.name)
const svc = createChunkService({
  overlay,
  store,
  ...(cfg.maxMessageBytes === undefined ? {} : { maxMessageBytes: cfg.maxMessageBytes }),
  log: createLogger({ level: 'warn', component: cfg.name }), // stderr
})
svc.start()
const sigs: TcpSignaling[] = []

async function connectAll(only?: string[]): Promise<void> {
  await Promise.all(
    cfg.links
      .filter((l) => only === undefined || only.includes(l.peer))
      .map(async (l) => {
        const sig = await connectTcpSignaling(cfg.relay.host, cfg.relay.port, l.room)
        sigs.push(sig)
        const link = await createWebRtcLink({
          peer: l.peer,
          initiator: l.initiator,
          signaling: sig,
          iceServers: cfg.iceServers ?? [],
          ...(cfg.iceAdditionalHostAddresses
            ? { iceAdditionalHostAddresses: cfg.iceAdditionalHostAddresses }
            : {}),
        })
        add(link)
      }),
  )
  out({ ev: 'open', peers: overlay.links().map((l) => ({ peer: l.peer, path: l.path })) })
}

type Cmd = {
  cmd: string
  file?: string
  mib?: number
  src?: string
  fraction?: number
  id?: string
  peers?: string[]
}

async function run(c: Cmd): Promise<void> {
  switch (c.cmd) {
    case 'connect':
      return connectAll(c.peers)
    case 'seed': {
      if (c.mib !== undefined) await writeTestFile(c.file!, c.mib * MiB)
      const b = await buildManifest(c.file!, { store, pin: `seed/${c.file}` })
      return out({ ev: 'seeded', id: b.id, size: b.manifest.size })
    }
    case 'variant': {
      await writeVariant(c.src!, c.file!, c.fraction ?? 0.1)
      const b = await buildManifest(c.file!, { store, pin: `seed/${c.file}` })
      return out({ ev: 'seeded', id: b.id, size: b.manifest.size })
    }
    case 'fetch': {
      const s0 = svc.stats()
      const m = await svc.fetchManifest(c.id!, c.peers ? { peers: c.peers } : {})
      const t0 = performance.now()
      const r = await svc.fetch(m, {
        ...(c.peers ? { peers: c.peers } : {}),
        ...(c.file ? { file: c.file } : {}),
        onProgress: (p) => out({ ev: 'progress', bytesFetched: p.bytesFetched, peers: p.peers }),
      })
      const secs = (performance.now() - t0) / 1000
      const s1 = svc.stats()
      return out({
        ev: 'fetched',
        ...r,
        mbps: r.bytesFetched / 1e6 / secs,
        wireIn: s1.wireBytesIn - s0.wireBytesIn,
        wireOut: s1.wireBytesOut - s0.wireBytesOut,
      })
    }
    case 'stats':
      return out({ ev: 'stats', ...svc.stats(), store: store.stats() })
    case 'exit':
      await shutdown()
  }
}

async function shutdown(): Promise<never> {
  svc.stop()
  for (const l of overlay.links()) l.close()
  for (const s of sigs) s.close()
  await store.close()
  process.exit(0)
}

const rl = createInterface({ input: process.stdin })
rl.on('line', (line) => {
  let c: Cmd
  try {
    c = JSON.parse(line) as Cmd
  } catch {
    return
  }
  run(c).catch((err: unknown) =>
    out({ ev: 'error', name: (err as Error).name, message: (err as Error).message }),
  )
})
rl.on('close', () => void shutdown())
process.on('SIGTERM', () => void shutdown())
