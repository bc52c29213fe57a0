/**
 * One WebRTC link end in its own process, driven by JSON lines on stdin, reporting JSON lines on
 * stdout. Used by the NAT system test (one per host namespace) and the link benchmark.
 *
 *   node --import tsx test/helpers/webrtc-peer.ts CONFIG.json
 *
 * CONFIG (a file, mode 0600: it may hold TURN credentials, which never go in argv):
 *   { name, peer, initiator, relay: {host, port}, room, iceServers?, iceTransportPolicy?, deadAfterMs?,
 *     engine?: 'werift' | 'libdatachannel', congestionControl?: 'tolerant' | 'reno' (werift),
 *     ndcSctp?: {...} (libdatachannel: usrsctp settings over NDC_SCTP_SETTINGS) }
 *
 * Commands (stdin):  {"cmd":"connect","room":"r2"}  builds a (new) link, room defaults to CONFIG.room
 *                    {"cmd":"send","bytes":N}        pumps N bytes on 'chunks' with backpressure
 *                    {"cmd":"ping","n":20}           RTT over 'control' (median of n round trips)
 *                    {"cmd":"close"} / {"cmd":"exit"}
 * Events (stdout):   {"ev":"open","path":{...},"setupMs":…}  {"ev":"closed","reason":"LinkDeadError","ms":…}
 *                    {"ev":"received","bytes":N,"ok":true,"mbps":…}  {"ev":"sent","bytes":N,"mbps":…}
 *                    {"ev":"rtt","ms":…}  {"ev":"error","message":…}
 */
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import type { IceServer } from '../../net/webrtc/interfaces.ts'
import { createWebRtcLink, type WebRtcLink } from '../../net/webrtc/link.ts'
import { connectTcpSignaling, type TcpSignaling } from './webrtc-signal-relay.ts'

export interface PeerConfig {
  name: string
  peer: string
  initiator: boolean
  relay: { host: string; port: number }
  room: string
  iceServers?: IceServer[]
  iceTransportPolicy?: 'all' | 'relay'
  iceAdditionalHostAddresses?: string[]
  deadAfterMs?: number
  /** Link engine (default werift). */
  engine?: 'werift' | 'libdatachannel'
  /** werift's SCTP congestion control (default: the link's). */
  congestionControl?: 'tolerant' | 'reno'
  /** libdatachannel: usrsctp settings over net/webrtc/ndc/engine.ts's NDC_SCTP_SETTINGS. */
  ndcSctp?: Record<string, number>
}

const cfg = JSON.parse(readFileSync(process.argv[2] ?? '', 'utf8')) as PeerConfig
const out = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`)

let link: WebRtcLink | undefined
let sig: TcpSignaling | undefined
let rx = { expect: -1, hash: '', got: 0, h: createHash('sha256'), t0: 0 }
const pongs = new Map<number, () => void>()

function attach(l: WebRtcLink): void {
  const chunks = l.channel('chunks')
  const control = l.channel('control')
  chunks.onMessage((m) => {
    if (rx.got === 0) rx.t0 = performance.now()
    rx.got += m.byteLength
    rx.h.update(m)
    checkDone()
  })
  control.onMessage((m) => {
    const msg = JSON.parse(Buffer.from(m).toString('utf8')) as {
      t: string
      n?: number
      bytes?: number
      hash?: string
    }
    if (msg.t === 'ping') control.send(Buffer.from(JSON.stringify({ t: 'pong', n: msg.n })))
    else if (msg.t === 'pong') pongs.get(msg.n ?? -1)?.()
    else if (msg.t === 'expect') {
      rx.expect = msg.bytes ?? 0
      rx.hash = msg.hash ?? ''
      checkDone()
    }
  })
  l.onClose((reason) => {
    out({ ev: 'closed', reason: reason?.name ?? 'none', message: reason?.message, silentMs: l.silentMs })
    sig?.close()
  })
}

function checkDone(): void {
  if (rx.expect < 0 || rx.got < rx.expect) return
  const secs = (performance.now() - rx.t0) / 1000
  out({ ev: 'received', bytes: rx.got, ok: rx.h.digest('hex') === rx.hash, mbps: rx.got / 1e6 / secs })
  rx = { expect: -1, hash: '', got: 0, h: createHash('sha256'), t0: 0 }
}

async function connectLink(room: string): Promise<void> {
  sig = await connectTcpSignaling(cfg.relay.host, cfg.relay.port, room)
  if (process.env.WEBRTC_PEER_DEBUG === '1') {
    const s = sig
    const send = s.send.bind(s)
    s.send = (m) => {
      process.stderr.write(`signal out: ${JSON.stringify(m)}\n`)
      send(m)
    }
    s.onMessage((m) => process.stderr.write(`signal in: ${JSON.stringify(m)}\n`))
  }
  if (cfg.engine === 'libdatachannel' && cfg.ndcSctp !== undefined) {
    const { configureNdcSctp } = await import('../../net/webrtc/ndc/engine.ts')
    configureNdcSctp(cfg.ndcSctp)
  }
  link = await createWebRtcLink({
    engine: cfg.engine ?? 'werift',
    ...(cfg.congestionControl === undefined ? {} : { congestionControl: cfg.congestionControl }),
    peer: cfg.peer,
    initiator: cfg.initiator,
    signaling: sig,
    iceServers: cfg.iceServers ?? [],
    iceTransportPolicy: cfg.iceTransportPolicy ?? 'all',
    ...(cfg.iceAdditionalHostAddresses ? { iceAdditionalHostAddresses: cfg.iceAdditionalHostAddresses } : {}),
    ...(cfg.deadAfterMs === undefined ? {} : { deadAfterMs: cfg.deadAfterMs }),
  })
  attach(link)
  out({ ev: 'open', path: link.path, setupMs: Math.round(link.setupMs) })
}

async function send(bytes: number): Promise<void> {
  const l = link!
  const ch = l.channel('chunks')
  const h = createHash('sha256')
  const t0 = performance.now()
  let sent = 0
  let seq = 0
  while (sent < bytes) {
    const size = Math.min(64 * 1024, bytes - sent)
    const m = Buffer.alloc(size, seq++ & 0xff)
    h.update(m)
    sent += size
    if (!ch.send(m)) await ch.onDrain()
  }
  l.channel('control').send(Buffer.from(JSON.stringify({ t: 'expect', bytes, hash: h.digest('hex') })))
  out({ ev: 'sent', bytes, mbps: bytes / 1e6 / ((performance.now() - t0) / 1000) })
}

async function ping(n: number): Promise<void> {
  const control = link!.channel('control')
  const rtts: number[] = []
  for (let i = 0; i < n; i++) {
    const t0 = performance.now()
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('pong timeout')), 5000)
      pongs.set(i, () => {
        clearTimeout(timer)
        pongs.delete(i)
        resolve()
      })
      control.send(Buffer.from(JSON.stringify({ t: 'ping', n: i })))
    })
    rtts.push(performance.now() - t0)
    await new Promise((r) => setTimeout(r, 20))
  }
  rtts.sort((a, b) => a - b)
  out({ ev: 'rtt', ms: rtts[Math.floor(rtts.length / 2)], min: rtts[0] })
}

const rl = createInterface({ input: process.stdin })
rl.on('line', (line) => {
  let cmd: { cmd: string; room?: string; bytes?: number; n?: number }
  try {
    cmd = JSON.parse(line)
  } catch {
    return
  }
  const run = async () => {
    switch (cmd.cmd) {
      case 'connect':
        return connectLink(cmd.room ?? cfg.room)
      case 'send':
        return send(cmd.bytes ?? 1024 * 1024)
      case 'ping':
        return ping(cmd.n ?? 20)
      case 'close':
        await link?.destroy()
        return
      case 'exit':
        await link?.destroy()
        sig?.close()
        process.exit(0)
    }
  }
  run().catch((err: unknown) =>
    out({ ev: 'error', name: (err as Error).name, message: (err as Error).message }),
  )
})
rl.on('close', () => {
  link?.close()
  sig?.close()
  setTimeout(() => process.exit(0), 200).unref()
})
process.on('SIGTERM', () => {
  link?.close()
  process.exit(0)
})
