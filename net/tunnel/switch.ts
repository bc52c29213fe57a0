/**
 * One L2 switch per agent (see interfaces.ts for the port model and v1/frames.ts for the wire format).
 *
 * Forwarding rules:
 * - From a local port: learn the source MAC there; group destinations (broadcast/multicast) and
 *   unknown unicast are flooded to every other local port and every remote port; known unicast goes to
 *   its port.
 * - From a remote port (split horizon): delivered to local ports only, never to another remote port.
 *   The overlay is a full mesh, so every member is one hop away and the sender already sent its flood
 *   to every member itself; relaying would only make loops. The one exception is a MAC that just moved
 *   away from this switch: for a grace period its frames are relayed once to its new host as FORWARDED
 *   messages, which are only ever delivered locally, never relayed again (so they cannot loop either).
 *
 * Moves: the new host announces the MAC (ANNOUNCE with an epoch, repeated because the channel is
 * lossy). A receiver accepts it only if the epoch is higher than any it has seen for that MAC, moves
 * the MAC's entry to the announcer and pins it there for a moment, so late frames the guest sent from
 * its old host (the channel is unordered) cannot move it back. QEMU's RARPs and the guest's gratuitous
 * ARPs after resume are ordinary broadcasts from the new host and teach the same thing to everyone.
 *
 * Pauses: while a guest is paused here (holdVm, e.g. a migration's switch-over), frames for it are
 * held by the switch instead of written into its QEMU, which does not read while paused and whose
 * socket buffer dies with it when the guest moves. Losing those frames is what made a client's TCP
 * stall for a retransmission timeout (≥ 200 ms) on top of the migration's downtime; held, they reach the
 * guest at its new host as soon as that host announces the MAC (or here, if the move rolls back), and
 * the client's TCP just carries on. The destination holds frames for its incoming guest the same way
 * until it runs.
 *
 * Small frames (at most BATCH_FRAME_BYTES: TCP ACKs, ARP) for one peer are packed into one BATCH message
 * per event-loop turn rather than sent one message each: every message costs an SCTP packet, a DTLS
 * record and a datagram at both ends, and a bulk TCP transfer through the tunnel sends one ACK for
 * every other segment. Bigger frames go at once (after whatever small ones came before them).
 *
 * Memory is bounded everywhere: the MAC table (LRU eviction plus ageing), the hold queues (paused
 * guests and moved MACs: at most holdFrames frames and holdBytes bytes each; when full the NEWEST frame
 * is dropped, counted as `hold-full`: tail drop keeps what is held in order, and TCP recovers a lost
 * tail by fast retransmit once the held head arrives), and every port's send queue (the driver or
 * channel drops when full; never grows).
 *
 * Why one file of ~750 lines (#18: files over ~600 lines say why): createSwitch is one closure over one
 * piece of state — the MAC table, the hold queues, the moved-MAC records, the ports — that every rule
 * above reads and changes while it handles one frame, synchronously and in order. Cut into files, the
 * rules would pass that state around and the invariants (split horizon, epochs, held order) would no
 * longer be readable in one place. What has a life of its own is already apart: the wire format
 * (v1/frames.ts), the port model (interfaces.ts), the QEMU stream port (stream-port.ts).
 */

import type { Logger } from '../../src/base/log.ts'
import { silentLogger } from '../../src/base/log.ts'
import { ChannelClosedError } from '../link/errors.ts'
import type { Link, MessageChannel, Overlay } from '../link/interfaces.ts'
import { TunnelError } from './errors.ts'
import {
  type AttachOptions,
  type DetachOptions,
  ETHERNET_HEADER_BYTES,
  MAX_FRAME_BYTES,
  type PortDriver,
  type PortFactory,
  type PortKind,
  type PortStatus,
  type SwitchStatus,
  TUNNEL_HEADER_BYTES,
  TUNNEL_MESSAGE_BUDGET,
  TUNNEL_MTU,
  type TunnelSwitch,
} from './interfaces.ts'
import { createStreamPort } from './stream-port.ts'
import {
  BATCH_ENTRY_HEADER_BYTES,
  BatchBuilder,
  decodeMessage,
  encodeAnnounce,
  encodeForwarded,
  encodeFrame,
  normalizeMac,
  parseMac,
} from './v1/frames.ts'

export interface SwitchOptions {
  overlay: Overlay
  log?: Logger
  /** Largest Ethernet frame forwarded (default MAX_FRAME_BYTES = 1198, i.e. MTU 1184). */
  maxFrameBytes?: number
  /** MAC table size; the least recently refreshed entry is evicted when full (default 4096). */
  maxMacs?: number
  /** Learned entries not refreshed for this long are forgotten (default 300 s, like Linux bridges). */
  ageMs?: number
  /** How long a moved-away MAC's frames are still forwarded to its new host (default 10 s). */
  graceMs?: number
  /**
   * Frames held per paused guest (holdVm) and per moved MAC while its new location is not yet known
   * (default 256: a 300 ms pause of a ~10 MB/s stream is ~2500 frames, but TCP needs only the first
   * ones to recover quickly, and the client's window is what limits the burst anyway).
   */
  holdFrames?: number
  /** Bytes held per queue, frames included (default 256 KiB). */
  holdBytes?: number
  /** After an announcement, frames from other ports cannot re-learn the MAC for this long (default 2 s). */
  pinMs?: number
  /** Delays of the announcement repeats after the first one (default 50, 150, 350, 750 ms). */
  announceRepeatsMs?: number[]
  /** Time source (tests). */
  now?: () => number
}

type Counters = { rxFrames: number; rxBytes: number; txFrames: number; txBytes: number; drops: number }
/** How long after an announcement a member whose link opens late is still told (ms). */
const REANNOUNCE_MS = 60_000

const zero = (): Counters => ({ rxFrames: 0, rxBytes: 0, txFrames: 0, txBytes: 0, drops: 0 })

interface Port {
  id: string
  kind: PortKind
  local: boolean
  counters: Counters
  /**
   * Sends one raw Ethernet frame; false when dropped. Remote ports: `forwarded` sends it as a relay
   * (FORWARDED). Local ports: `forwarded` says it came from a remote port (a held frame that later
   * moves on to the guest's new host must then travel as FORWARDED, never be relayed again).
   */
  send(frame: Uint8Array, forwarded?: boolean): boolean
  close(): Promise<void> | void
  connected?: () => boolean
  detail?: string
  mac?: number
}

interface Entry {
  port: string
  seen: number
  /** Attached VM MAC on this switch: never aged or evicted. */
  fixed: boolean
  pinnedUntil: number
}

/** A bounded queue of held frames; `fwd` marks frames that came from a remote port (relay as FORWARDED). */
interface Held {
  frames: Array<{ frame: Uint8Array; fwd: boolean }>
  bytes: number
}
const emptyHeld = (): Held => ({ frames: [], bytes: 0 })

interface Moved {
  until: number
  /** Peer the MAC moved to, once known. */
  to?: string
  /** Frames waiting for `to`. */
  hold: Held
}

/** 6 MAC bytes at `off` as a number (48 bits fit exactly in a double): cheap Map key per frame. */
function macKey(b: Uint8Array, off: number): number {
  return (
    (b[off]! * 0x10000 + b[off + 1]! * 0x100 + b[off + 2]!) * 0x1000000 +
    b[off + 3]! * 0x10000 +
    b[off + 4]! * 0x100 +
    b[off + 5]!
  )
}

/**
 * Frames up to this size (two always fit one message) are batched per remote port: what a switch
 * sends a peer in one event-loop turn (a burst of TCP ACKs for a bulk transfer, ARP) travels as one
 * BATCH message instead of one SCTP packet, DTLS record and UDP datagram each. Bigger frames go at once.
 */
export const BATCH_FRAME_BYTES = Math.floor(
  (TUNNEL_MESSAGE_BUDGET - TUNNEL_HEADER_BYTES - 2 * BATCH_ENTRY_HEADER_BYTES) / 2,
)

export function macKeyOf(mac: string): number {
  return macKey(parseMac(mac), 0)
}

export function createSwitch(o: SwitchOptions): TunnelSwitch {
  const overlay = o.overlay
  const log = o.log ?? silentLogger
  const maxFrame = o.maxFrameBytes ?? MAX_FRAME_BYTES
  const maxMacs = o.maxMacs ?? 4096
  const ageMs = o.ageMs ?? 300_000
  const graceMs = o.graceMs ?? 10_000
  const holdFrames = o.holdFrames ?? 256
  const holdBytes = o.holdBytes ?? 256 * 1024
  const pinMs = o.pinMs ?? 2000
  const repeats = o.announceRepeatsMs ?? [50, 150, 350, 750]
  const now = o.now ?? Date.now

  const ports = new Map<string, Port>()
  const localPorts: Port[] = []
  const remotePorts: Port[] = []
  const table = new Map<number, Entry>()
  const epochs = new Map<number, number>()
  const moved = new Map<number, Moved>()
  const vmPorts = new Map<number, string>()
  /** Paused guests attached here (holdVm): frames for them wait here, not in QEMU. */
  const paused = new Map<number, Held>()
  /**
   * This host's recent announcements (MAC → epoch, when): a member whose link comes up later (it, or
   * this agent, restarted meanwhile) gets them then, or it would keep sending the guest's frames to
   * its old host (measured: a guest re-adopted by a restarted agent stayed unreachable for 56 s).
   */
  const recentAnnounces = new Map<number, { mac: string; epoch: number; at: number }>()
  let heldTotal = 0
  const drops: Record<string, number> = {}
  const timers = new Set<NodeJS.Timeout>()
  const unsubs: Array<() => void> = []
  let sweeper: NodeJS.Timeout | undefined
  let started = false

  /** Remote ports with small frames waiting; flushed once per event-loop turn (setImmediate). */
  const pendingFlushes: Array<() => void> = []
  let flushTimer: NodeJS.Immediate | undefined
  const flushAll = () => {
    flushTimer = undefined
    for (const f of pendingFlushes.splice(0)) f()
  }
  const scheduleFlush = (f: () => void) => {
    pendingFlushes.push(f)
    flushTimer ??= setImmediate(flushAll)
  }

  const drop = (reason: string) => {
    drops[reason] = (drops[reason] ?? 0) + 1
  }
  const rebuildLists = () => {
    localPorts.length = 0
    remotePorts.length = 0
    for (const p of ports.values()) (p.local ? localPorts : remotePorts).push(p)
  }
  const remotePortId = (peer: string) => `peer:${peer}`

  /** Appends a copy (the frame is a view into a socket/channel buffer that will be reused); tail drop. */
  function hold(h: Held, frame: Uint8Array, fwd: boolean): boolean {
    if (h.frames.length >= holdFrames || h.bytes + frame.byteLength > holdBytes) {
      drop('hold-full')
      return false
    }
    h.frames.push({ frame: frame.slice(), fwd })
    h.bytes += frame.byteLength
    return true
  }

  /**
   * A paused guest's held frames move to its moved-away entry, ahead of anything held there (they
   * arrived first). Group frames stay behind: they were flooded to every member, the new host included.
   */
  function takePaused(key: number, m: Moved): void {
    const h = paused.get(key)
    if (h === undefined) return
    paused.delete(key)
    const uni = h.frames.filter((f) => (f.frame[0]! & 1) === 0)
    if (uni.length === 0) return
    m.hold = {
      frames: [...uni, ...m.hold.frames],
      bytes: uni.reduce((n, f) => n + f.frame.byteLength, m.hold.bytes),
    }
  }

  function deliver(port: Port, frame: Uint8Array, forwarded = false): void {
    if (port.send(frame, forwarded)) {
      port.counters.txFrames++
      port.counters.txBytes += frame.byteLength
    } else port.counters.drops++
  }

  function setEntry(key: number, port: string, fixed: boolean, pinnedUntil = 0): void {
    const t = now()
    const e = table.get(key)
    if (e !== undefined) table.delete(key)
    else if (table.size >= maxMacs) evictOne()
    table.set(key, { port, seen: t, fixed, pinnedUntil })
  }

  function evictOne(): void {
    for (const [k, e] of table) {
      if (!e.fixed) {
        table.delete(k)
        drop('evicted')
        return
      }
    }
  }

  function learn(key: number, port: Port): void {
    const e = table.get(key)
    const t = now()
    if (e !== undefined) {
      if (e.port === port.id) {
        // Refresh; re-insert (LRU order) at most once a second to keep the per-frame cost low.
        if (t - e.seen > 1000) {
          table.delete(key)
          e.seen = t
          table.set(key, e)
        }
        return
      }
      // A VM attached here owns its MAC; a frame from elsewhere with that source is a straggler.
      if (e.fixed) return
      if (e.pinnedUntil > t) return
    }
    setEntry(key, port.id, false)
  }

  function flood(frame: Uint8Array, from: Port, toRemote: boolean): void {
    for (const p of localPorts) if (p !== from) deliver(p, frame, !from.local)
    if (toRemote) for (const p of remotePorts) deliver(p, frame)
  }

  function holdOrForward(m: Moved, frame: Uint8Array, fwd: boolean, from: Port): void {
    if (m.to !== undefined) {
      // Also back to the sender when that is where the MAC went (it sent before it heard its own
      // announcement take effect): still safe, a FORWARDED frame is never relayed again.
      const p = ports.get(remotePortId(m.to))
      if (p === undefined) {
        drop('moved-unreachable')
        return
      }
      deliver(p, frame, fwd || p === from)
      return
    }
    hold(m.hold, frame, fwd)
  }

  function fromLocal(port: Port, frame: Uint8Array): void {
    port.counters.rxFrames++
    port.counters.rxBytes += frame.byteLength
    if (frame.byteLength < ETHERNET_HEADER_BYTES) {
      drop('runt')
      return
    }
    if (frame.byteLength > maxFrame) {
      port.counters.drops++
      drop('oversize')
      return
    }
    if ((frame[6]! & 1) === 0) learn(macKey(frame, 6), port)
    if ((frame[0]! & 1) === 1) {
      flood(frame, port, true)
      return
    }
    const dst = macKey(frame, 0)
    const m = moved.get(dst)
    if (m !== undefined && m.until > now()) {
      holdOrForward(m, frame, false, port)
      return
    }
    const e = table.get(dst)
    if (e !== undefined) {
      if (e.port === port.id) {
        drop('same-port')
        return
      }
      const p = ports.get(e.port)
      if (p !== undefined) {
        deliver(p, frame)
        return
      }
    }
    flood(frame, port, true)
  }

  function fromRemote(port: Port, msg: Uint8Array): void {
    const d = decodeMessage(msg)
    if (!d.ok) {
      port.counters.rxFrames++
      port.counters.rxBytes += msg.byteLength
      drop(`decode-${d.reason}`)
      return
    }
    if (d.type === 'announce') {
      port.counters.rxFrames++
      port.counters.rxBytes += msg.byteLength
      onAnnounce(port, d.mac, d.epoch)
      return
    }
    if (d.type === 'batch') {
      for (const f of d.frames) fromRemoteFrame(port, f, false)
      return
    }
    fromRemoteFrame(port, d.frame, d.type === 'forwarded')
  }

  function fromRemoteFrame(port: Port, frame: Uint8Array, forwarded: boolean): void {
    port.counters.rxFrames++
    port.counters.rxBytes += frame.byteLength
    if (frame.byteLength > maxFrame) {
      drop('oversize')
      return
    }
    const dst = macKey(frame, 0)
    if (forwarded) {
      // Relayed once already: local delivery only, and no learning (the source is not at the relay).
      // A NIC attached here takes it even before its announcement: the old host says it moved here.
      const vmPort = vmPorts.get(dst)
      const e = table.get(dst)
      const p = vmPort !== undefined ? ports.get(vmPort) : e === undefined ? undefined : ports.get(e.port)
      if (p?.local === true) {
        deliver(p, frame, true)
        return
      }
      drop('forwarded-not-here')
      return
    }
    if ((frame[6]! & 1) === 0) learn(macKey(frame, 6), port)
    if ((frame[0]! & 1) === 1) {
      flood(frame, port, false)
      return
    }
    const m = moved.get(dst)
    if (m !== undefined && m.until > now()) {
      holdOrForward(m, frame, true, port)
      return
    }
    const e = table.get(dst)
    if (e !== undefined) {
      const p = ports.get(e.port)
      if (p?.local === true) {
        deliver(p, frame, true)
        return
      }
      if (p !== undefined) {
        drop('split-horizon')
        return
      }
    }
    flood(frame, port, false)
  }

  function onAnnounce(port: Port, mac: string, epoch: number): void {
    const key = macKeyOf(mac)
    const known = epochs.get(key)
    // The same epoch again is one of the announcer's own repeats; a lower one is stale.
    if (known !== undefined && epoch === known) {
      drop('announce-repeat')
      return
    }
    if (known !== undefined && epoch < known) {
      drop('stale-announce')
      return
    }
    noteEpoch(key, epoch)
    const peer = port.detail!
    const t = now()
    const local = vmPorts.get(key)
    if (local !== undefined || moved.has(key)) {
      // The VM was here: it now runs at the announcer. Forward stragglers there for the grace period.
      const m = moved.get(key) ?? { until: t + graceMs, hold: emptyHeld() }
      m.until = Math.max(m.until, t + graceMs)
      m.to = peer
      moved.set(key, m)
      // What the paused guest was not given here goes to where it runs now, first.
      takePaused(key, m)
      flushHold(m)
    }
    setEntry(key, port.id, false, t + pinMs)
    log.debug('MAC moved', { mac, peer, epoch })
  }

  function flushHold(m: Moved): void {
    if (m.to === undefined || m.hold.frames.length === 0) return
    const p = ports.get(remotePortId(m.to))
    const held = m.hold.frames
    m.hold = emptyHeld()
    if (p === undefined) {
      drops['moved-unreachable'] = (drops['moved-unreachable'] ?? 0) + held.length
      return
    }
    for (const h of held) deliver(p, h.frame, h.fwd)
  }

  function noteEpoch(key: number, epoch: number): void {
    epochs.delete(key)
    if (epochs.size >= maxMacs) {
      const first = epochs.keys().next()
      if (first.done !== true) epochs.delete(first.value)
    }
    epochs.set(key, epoch)
  }

  function sweep(): void {
    const t = now()
    for (const [k, e] of table) if (!e.fixed && t - e.seen > ageMs) table.delete(k)
    for (const [k, m] of moved) {
      if (m.until <= t) {
        if (m.hold.frames.length > 0)
          drops['hold-expired'] = (drops['hold-expired'] ?? 0) + m.hold.frames.length
        moved.delete(k)
      }
    }
  }

  function addRemote(link: Link): void {
    const id = remotePortId(link.peer)
    const old = ports.get(id)
    if (old !== undefined) void old.close()
    let ch: MessageChannel
    try {
      ch = link.channel('tunnel')
    } catch (err) {
      log.warn('link has no tunnel channel', {
        peer: link.peer,
        error: err instanceof Error ? err : String(err),
      })
      return
    }
    const counters = old?.counters ?? zero()
    const port: Port = {
      id,
      kind: 'remote',
      local: false,
      counters,
      detail: link.peer,
      send(frame, forwarded) {
        if (ch.state !== 'open') return false
        if (forwarded !== true && frame.byteLength <= BATCH_FRAME_BYTES) {
          // Small frames wait for the end of this event-loop turn and leave together (flushAll).
          if (!batch.add(frame)) {
            flushBatch()
            batch.add(frame)
          }
          if (batch.count === 1) scheduleFlush(flushBatch)
          return true
        }
        // Keep this port's frames in the order they came (the channel itself is unordered anyway).
        flushBatch()
        return sendRaw(forwarded === true ? encodeForwarded(frame) : encodeFrame(frame))
      },
      close() {
        batch.take()
        offMsg()
        offClose()
      },
    }
    const batch = new BatchBuilder(TUNNEL_MESSAGE_BUDGET)
    const sendRaw = (msg: Uint8Array): boolean => {
      if (ch.state !== 'open') return false
      try {
        return ch.send(msg)
      } catch (err) {
        if (err instanceof ChannelClosedError) return false
        throw err
      }
    }
    /** Sends what the batch holds. Its frames were counted as sent; a refused message undoes that. */
    const flushBatch = () => {
      const n = batch.count
      const bytes = batch.frameBytes
      const msg = batch.take()
      if (msg === undefined || sendRaw(msg)) return
      counters.txFrames -= n
      counters.txBytes -= bytes
      counters.drops += n
    }
    const offMsg = ch.onMessage((msg) => fromRemote(port, msg))
    const offClose = link.onClose(() => {
      if (ports.get(id) !== port) return
      port.close()
      ports.delete(id)
      rebuildLists()
      for (const [k, e] of table) if (e.port === id) table.delete(k)
    })
    ports.set(id, port)
    rebuildLists()
    reannounceTo(link.peer, sendRaw)
  }

  /** Repeats this host's recent announcements of MACs still here to a member whose link just opened. */
  function reannounceTo(peer: string, send: (msg: Uint8Array) => boolean): void {
    const t = now()
    const msgs: Uint8Array[] = []
    for (const [key, a] of recentAnnounces) {
      if (t - a.at > REANNOUNCE_MS || vmPorts.get(key) === undefined) recentAnnounces.delete(key)
      else msgs.push(encodeAnnounce(a.mac, a.epoch))
    }
    if (msgs.length === 0) return
    log.debug('re-announcing MACs to a new link', { peer, count: msgs.length })
    for (const delay of [0, ...repeats]) {
      const timer = setTimeout(() => {
        timers.delete(timer)
        if (started) for (const m of msgs) send(m)
      }, delay)
      timers.add(timer)
    }
  }

  function sendAnnounceAll(mac: string, epoch: number): void {
    const msg = encodeAnnounce(mac, epoch)
    for (const link of overlay.links()) {
      try {
        const ch = link.channel('tunnel')
        if (ch.state === 'open') ch.send(msg)
      } catch {
        // A link closing under us: the others still get it.
      }
    }
  }

  const sw: TunnelSwitch = {
    self: overlay.self,
    start() {
      if (started) return
      started = true
      for (const l of overlay.links()) if (l.state === 'open') addRemote(l)
      unsubs.push(overlay.onLink((l) => addRemote(l)))
      sweeper = setInterval(sweep, Math.max(50, Math.min(ageMs, graceMs) / 4))
      sweeper.unref()
    },
    async stop() {
      started = false
      for (const u of unsubs.splice(0)) u()
      if (sweeper !== undefined) clearInterval(sweeper)
      if (flushTimer !== undefined) clearImmediate(flushTimer)
      flushTimer = undefined
      pendingFlushes.length = 0
      for (const t of timers) clearTimeout(t)
      timers.clear()
      const all = [...ports.values()]
      ports.clear()
      rebuildLists()
      await Promise.all(all.map((p) => p.close()))
      table.clear()
      moved.clear()
      vmPorts.clear()
      paused.clear()
      recentAnnounces.clear()
    },
    addPort(id, kind, factory: PortFactory) {
      if (ports.has(id)) throw new TunnelError(`port '${id}' already exists`)
      const port: Port = {
        id,
        kind,
        local: true,
        counters: zero(),
        send: () => false,
        close: () => {},
      }
      const driver: PortDriver = factory((frame) => {
        if (ports.get(id) === port) fromLocal(port, frame)
      })
      port.send = (frame) => driver.send(frame)
      port.close = () => driver.close()
      if (driver.connected !== undefined) port.connected = () => driver.connected!()
      ports.set(id, port)
      rebuildLists()
      return async () => {
        if (ports.get(id) !== port) return
        ports.delete(id)
        rebuildLists()
        for (const [k, e] of table) if (e.port === id) table.delete(k)
        await driver.close()
      }
    },
    attachVm(mac: string, socketPath: string, options: AttachOptions = {}) {
      const norm = normalizeMac(mac)
      const key = macKeyOf(norm)
      const id = `vm:${norm}`
      if (vmPorts.has(key)) throw new TunnelError(`VM NIC ${norm} is already attached to this switch`)
      moved.delete(key)
      sw.addPort(id, 'vm', (receive) =>
        createStreamPort({ path: socketPath, receive, log: log.child(`vm ${norm}`) }),
      )
      const port = ports.get(id)!
      port.detail = norm
      const direct = port.send
      port.send = (frame, fromRemote) => {
        const h = paused.get(key)
        if (h === undefined) return direct(frame)
        if (!hold(h, frame, fromRemote === true)) return false
        heldTotal++
        return true
      }
      vmPorts.set(key, id)
      paused.delete(key)
      if (options.hold === true) paused.set(key, emptyHeld())
      // Not the MAC's location yet: a migration destination attaches long before the guest resumes
      // here, and until then frames for it must keep going to the source. announce() makes it so.
      if (options.from !== undefined)
        log.debug('VM NIC attached after a move', { mac: norm, from: options.from })
    },
    async detachVm(mac: string, options: DetachOptions = {}) {
      const norm = normalizeMac(mac)
      const key = macKeyOf(norm)
      const id = vmPorts.get(key)
      if (id === undefined) return
      vmPorts.delete(key)
      const p = ports.get(id)
      ports.delete(id)
      rebuildLists()
      const e = table.get(key)
      const m = moved.get(key) ?? { until: 0, hold: emptyHeld() }
      m.until = now() + graceMs
      if (options.to !== undefined) m.to = options.to
      else if (e !== undefined && e.port !== id) m.to = ports.get(e.port)?.detail
      moved.set(key, m)
      if (e?.port === id) table.delete(key)
      takePaused(key, m)
      flushHold(m)
      await p?.close()
    },
    holdVm(mac: string) {
      const key = macKeyOf(mac)
      if (vmPorts.has(key) && !paused.has(key)) paused.set(key, emptyHeld())
    },
    resumeVm(mac: string) {
      const key = macKeyOf(mac)
      const h = paused.get(key)
      if (h === undefined) return
      paused.delete(key)
      const p = ports.get(vmPorts.get(key) ?? '')
      if (p === undefined) return
      for (const f of h.frames) deliver(p, f.frame)
    },
    announce(mac: string, epoch?: number) {
      const norm = normalizeMac(mac)
      const key = macKeyOf(norm)
      const e = Math.max(epoch ?? 0, (epochs.get(key) ?? 0) + 1, epoch === undefined ? now() : 0)
      noteEpoch(key, e)
      recentAnnounces.set(key, { mac: norm, epoch: e, at: now() })
      moved.delete(key)
      const id = vmPorts.get(key)
      if (id !== undefined) setEntry(key, id, true)
      sendAnnounceAll(norm, e)
      for (const delay of repeats) {
        const t = setTimeout(() => {
          timers.delete(t)
          if (started) sendAnnounceAll(norm, e)
        }, delay)
        timers.add(t)
      }
      log.info('announced MAC', { mac: norm, epoch: e })
      return e
    },
    lookup(mac: string) {
      const key = macKeyOf(mac)
      const m = moved.get(key)
      if (m !== undefined && m.until > now()) return m.to === undefined ? 'held' : remotePortId(m.to)
      return table.get(key)?.port
    },
    status(): SwitchStatus {
      const list: PortStatus[] = [...ports.values()].map((p) => ({
        id: p.id,
        kind: p.kind,
        ...p.counters,
        ...(p.connected !== undefined ? { connected: p.connected() } : {}),
        ...(p.detail !== undefined ? { detail: p.detail } : {}),
      }))
      let held = 0
      for (const h of paused.values()) held += h.frames.length
      for (const m of moved.values()) held += m.hold.frames.length
      return {
        ports: list,
        macs: table.size,
        movedAway: moved.size,
        held,
        heldTotal,
        announcesPending: timers.size,
        drops: { ...drops },
        mtu: maxFrame - 14,
      }
    },
  }
  return sw
}

export { TUNNEL_MTU }
