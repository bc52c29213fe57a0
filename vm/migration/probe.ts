/**
 * Liveness of the other end while the guest is paused. Once the source sent 'final' it only waits
 * ('ready', then 'resumed'), and the link's own heartbeat needs several seconds to call a dead peer
 * dead (4.5 s on the WebRTC link, longer when the link is rebuilt meanwhile). A paused guest cannot
 * afford that: the source pings the peer's migration service (which answers pings of unknown sessions
 * at once, whatever its sessions are doing) every intervalMs, and calls it dead after deadAfterMs
 * without a pong. Before the commit that is a rollback (nothing else can have run); after it, the
 * source starts asking (settle.ts) instead of waiting out its timeout.
 *
 * A stall of this process (its timers fire late) is not the peer's silence: a tick that comes much
 * later than planned restarts the count.
 */
import { Conversation } from './conversation.ts'
import { MigrationLinkError } from './errors.ts'
import type { MigrationChannel } from './interfaces.ts'
import { newSessionId } from './v1/messages.ts'

export interface ProbeInit {
  channel: MigrationChannel
  register(sid: string, conv: Conversation): () => void
  /** Between two pings (default 200 ms). */
  intervalMs?: number
  /** Silence after which the peer counts as dead (default 1500 ms). */
  deadAfterMs?: number
  /** For the error message. */
  peerName: string
  onDead(err: MigrationLinkError): void
}

/** Starts probing; returns stop(). onDead is called at most once. */
export function startProbe(init: ProbeInit): () => void {
  const intervalMs = init.intervalMs ?? 200
  const deadAfterMs = init.deadAfterMs ?? 1500
  const sid = newSessionId()
  const conv = new Conversation(init.channel, sid)
  const unregister = init.register(sid, conv)
  let stopped = false
  let heard = performance.now()
  let lastTick = heard
  const stop = () => {
    if (stopped) return
    stopped = true
    clearInterval(timer)
    unregister()
    conv.close()
  }
  const listen = () => {
    conv.next(['pong'], 'pong', 3_600_000).then(
      () => {
        heard = performance.now()
        if (!stopped) listen()
      },
      () => {},
    )
  }
  listen()
  const timer = setInterval(() => {
    const now = performance.now()
    // Our own stall (GC, a long synchronous step): the peer had no chance to be heard. Count afresh.
    if (now - lastTick > Math.max(3 * intervalMs, 500)) heard = now
    lastTick = now
    if (now - heard > deadAfterMs) {
      const ms = Math.round(now - heard)
      stop()
      init.onDead(new MigrationLinkError(`${init.peerName} stopped answering (no reply for ${ms} ms)`))
      return
    }
    conv.trySend({ type: 'ping', sid, t0: Date.now() })
  }, intervalMs)
  timer.unref?.()
  conv.trySend({ type: 'ping', sid, t0: Date.now() })
  return stop
}
