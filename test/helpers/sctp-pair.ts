/**
 * Two werift SCTP associations in this process, joined by an emulated path with a one-way delay, a
 * bottleneck rate and random loss that the test controls: no ICE, no DTLS, no sockets. It runs werift's
 * own SCTP code (the ESM bundle the link uses, as patched by patches/werift+0.24.4.patch), so congestion
 * control, SACK policy and retransmission can be tested at a real RTT in a second, deterministically
 * (seeded loss) and without root.
 *
 * Delivery is batched per timer tick, as a busy event loop reads a burst of datagrams from a socket in one
 * turn: what the receiver acknowledges per turn matches what it does over UDP.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { RTCSctpTransport } from 'werift'
import { prng } from './prng.ts'
import { mainWaitMs } from './schedstat.ts'

/** The fields of werift's SCTP association the tests read (its internals; checked at start). */
export interface WeriftSctp {
  /** Added by patches/werift+0.24.4.patch. */
  congestionControl: 'tolerant' | 'reno'
  cwnd: number
  ssthresh: number | undefined
  flightSize: number
  rto: number
  srtt: number | undefined
  peerAdvertisedRwnd: number
  advertisedRwnd: number
  outboundQueue: unknown[]
  /** DATA chunks sent and not yet acknowledged cumulatively. */
  sentQueue: unknown[]
  associationState: number
  isServer: boolean
  start(remotePort?: number): Promise<void>
  stop(): Promise<void>
  send(
    streamId: number,
    ppId: number,
    data: Buffer,
    opts?: { expiry?: number; maxRetransmits?: number; ordered?: boolean },
  ): Promise<void>
  onReceive: { subscribe(fn: (streamId: number, ppId: number, data: Buffer) => void): unknown }
  stateChanged: { connected: { asPromise(): Promise<unknown> } }
  flush: { asPromise(): Promise<unknown> }
}

export interface PathSpec {
  /** One-way delay in ms (RTT = 2 ×). */
  oneWayMs: number
  /** Bottleneck rate in bytes per second (default: unlimited). */
  rateBps?: number
  /** Probability that a packet is dropped, 0..1 (default 0). */
  loss?: number
  /** Packets the bottleneck queue holds before it tail-drops (default: unlimited). */
  queuePackets?: number
  /** PRNG seed for the loss (default 1). */
  seed?: number
  /** Drops exactly the packets this returns true for (deterministic loss; `loss` still applies). */
  drop?: (packet: Buffer) => boolean
}

/** One direction of the path: FIFO, rate-limited, delayed, lossy. */
class Direction {
  private readonly queue: { at: number; data: Buffer }[] = []
  private timer: NodeJS.Timeout | undefined
  private nextFree = 0
  private readonly random: () => number
  deliver: (data: Buffer) => void = () => {}
  readonly stats = { packets: 0, bytes: 0, dropped: 0, queueDropped: 0 }
  closed = false

  constructor(readonly spec: PathSpec) {
    this.random = prng(spec.seed ?? 1)
  }

  send(data: Buffer): void {
    if (this.closed) return
    this.stats.packets++
    this.stats.bytes += data.byteLength
    if (this.spec.drop?.(data) === true || ((this.spec.loss ?? 0) > 0 && this.random() < this.spec.loss!)) {
      this.stats.dropped++
      return
    }
    const now = performance.now()
    let departs = now
    if (this.spec.rateBps !== undefined) {
      const limit = this.spec.queuePackets
      if (limit !== undefined && this.queue.length >= limit) {
        this.stats.queueDropped++
        return
      }
      departs = Math.max(now, this.nextFree) + (data.byteLength / this.spec.rateBps) * 1000
      this.nextFree = departs
    }
    this.queue.push({ at: departs + this.spec.oneWayMs, data: Buffer.from(data) })
    this.arm()
  }

  private arm(): void {
    if (this.timer !== undefined || this.queue.length === 0) return
    const wait = Math.max(0, this.queue[0]!.at - performance.now())
    this.timer = setTimeout(() => {
      this.timer = undefined
      const now = performance.now()
      while (this.queue.length > 0 && this.queue[0]!.at <= now + 0.5) {
        const p = this.queue.shift()!
        if (!this.closed) this.deliver(p.data)
      }
      this.arm()
    }, wait)
  }

  close(): void {
    this.closed = true
    clearTimeout(this.timer)
    this.queue.length = 0
  }
}

function makeSctp(out: Direction, isServer: boolean): WeriftSctp {
  // werift builds its SCTP association inside RTCSctpTransport.setDtlsTransport; a stand-in DTLS
  // transport that carries packets over the emulated path is all it needs.
  const dtls = {
    id: `emulated-${Math.random()}`,
    dataReceiver: (_: Buffer) => {},
    sendData: async (data: Buffer) => out.send(data),
    onStateChange: { subscribe: () => ({ unSubscribe: () => {} }) },
    iceTransport: { role: isServer ? 'controlled' : 'controlling' },
  }
  const t = new RTCSctpTransport() as unknown as {
    setDtlsTransport(d: unknown): void
    sctp: WeriftSctp
  }
  t.setDtlsTransport(dtls)
  const sctp = t.sctp
  for (const k of [
    'cwnd',
    'flightSize',
    'rto',
    'outboundQueue',
    'sentQueue',
    'advertisedRwnd',
    'congestionControl',
  ] as const)
    if (!(k in sctp))
      throw new Error(`werift's SCTP has no '${k}' any more: update test/helpers/sctp-pair.ts`)
  sctp.isServer = isServer
  return sctp
}

export interface SctpPair {
  client: WeriftSctp
  server: WeriftSctp
  forward: Direction['stats']
  backward: Direction['stats']
  close(): Promise<void>
}

/** Two connected associations over the emulated path (same spec both ways; loss seeds differ). */
export async function sctpPair(
  spec: PathSpec,
  opts: { congestionControl?: 'tolerant' | 'reno' } = {},
): Promise<SctpPair> {
  const fwd = new Direction(spec)
  const back = new Direction({ ...spec, seed: (spec.seed ?? 1) + 1000 })
  const client = makeSctp(fwd, false)
  const server = makeSctp(back, true)
  if (opts.congestionControl !== undefined) {
    client.congestionControl = opts.congestionControl
    server.congestionControl = opts.congestionControl
  }
  fwd.deliver = (d) => {
    void (server as unknown as { handleData(b: Buffer): Promise<void> }).handleData(d)
  }
  back.deliver = (d) => {
    void (client as unknown as { handleData(b: Buffer): Promise<void> }).handleData(d)
  }
  const connected = Promise.all([
    client.stateChanged.connected.asPromise(),
    server.stateChanged.connected.asPromise(),
  ])
  await server.start(5000)
  await client.start(5000)
  await connected
  return {
    client,
    server,
    forward: fwd.stats,
    backward: back.stats,
    async close() {
      fwd.close()
      back.close()
      await Promise.all([client.stop().catch(() => {}), server.stop().catch(() => {})])
    },
  }
}

/**
 * Keeps `sctp` busy with `messageBytes` messages on one ordered reliable stream for `ms` milliseconds
 * (about 2 MiB handed to SCTP at once, like the link's window), sampling cwnd every `sampleMs`. Each
 * message carries its sequence number and a pattern, so the receiver checks order and content. Resolves
 * once everything sent has arrived (or `drainMs` later), with what arrived and the samples.
 */
export async function pushFor(
  sctp: WeriftSctp,
  peer: WeriftSctp,
  ms: number,
  opts: {
    messageBytes?: number
    sampleMs?: number
    streamId?: number
    drainMs?: number
    /** Stop sending early once this holds (checked before each message). */
    until?: () => boolean
  } = {},
): Promise<{
  bytes: number
  mbps: number
  sent: number
  received: number
  corrupt: number
  cwnd: { t: number; cwnd: number; flight: number; bytes: number }[]
  /** The longest the event loop was held up while sending (ms): the emulated path runs on this
   *  process's timers, so a stall far past its one-way delay delivers in bursts no real path would. */
  maxStallMs: number
  /** Share of the wall time this process's main thread was runnable but waiting for a CPU (Linux
   *  schedstat run delay): high when the box starved it, low when its own work was slow. */
  waitShare: number
}> {
  const size = opts.messageBytes ?? 64 * 1024
  const streamId = opts.streamId ?? 1
  let bytes = 0
  let received = 0
  let corrupt = 0
  let lastArrival = performance.now()
  peer.onReceive.subscribe((_s, _p, data) => {
    const seq = data.readUInt32BE(0)
    if (seq !== received || data.byteLength !== size || data[size - 1] !== (seq & 0xff)) corrupt++
    received++
    bytes += data.byteLength
    lastArrival = performance.now()
  })
  const samples: { t: number; cwnd: number; flight: number; bytes: number }[] = []
  const stalls = monitorEventLoopDelay({ resolution: 10 })
  stalls.enable()
  const wait0 = mainWaitMs()
  const t0 = performance.now()
  const sampler = setInterval(
    () => samples.push({ t: performance.now() - t0, cwnd: sctp.cwnd, flight: sctp.flightSize, bytes }),
    opts.sampleMs ?? 50,
  )
  let sent = 0
  let stop = false
  const deadline = setTimeout(() => {
    stop = true
  }, ms)
  try {
    // werift's send() resolves when the message left its outbound queue: several senders side by side.
    const senders = Math.max(1, Math.ceil((2 * 1024 * 1024) / size))
    await Promise.all(
      Array.from({ length: senders }, async () => {
        while (!stop && opts.until?.() !== true) {
          const msg = Buffer.alloc(size, sent & 0xff)
          msg.writeUInt32BE(sent, 0)
          sent++
          await sctp.send(streamId, 53, msg, { ordered: true })
        }
      }),
    )
    const drainMs = opts.drainMs ?? 5000
    while (received < sent && performance.now() - lastArrival < drainMs)
      await new Promise((r) => setTimeout(r, 20))
  } finally {
    clearTimeout(deadline)
    clearInterval(sampler)
    stalls.disable()
  }
  const secs = (performance.now() - t0) / 1000
  const maxStallMs = Math.round(stalls.max / 1e6)
  const waitShare = (mainWaitMs() - wait0) / 1000 / secs
  return { bytes, mbps: bytes / 1e6 / secs, sent, received, corrupt, cwnd: samples, maxStallMs, waitShare }
}
