import { Listeners } from '../channel-base.ts'
import type { BulkPath, ChannelName, Link, LinkState, MessageChannel, PathInfo } from '../interfaces.ts'
import { DirectPathError, SwitchableChannel } from './channels.ts'
import { DIRECT_CHANNELS } from './v1/messages.ts'

/** A link whose bulk channels can move from the WebRTC link to a direct libp2p stream. */
export interface PathLink extends Link {
  /** Moves the bulk channels to these direct channels (one per DIRECT_CHANNELS entry). Once. */
  upgrade(direct: ReadonlyMap<ChannelName, MessageChannel>, info: { remote: string; via?: BulkPath }): void
  readonly base: Link
}

/**
 * Wraps a WebRTC link: `control` and `tunnel` stay on it; `chunks` and `migrate` are switchable. The
 * link is one unit: if either path fails, the whole link closes (the node rebuilds it, WebRTC first),
 * so services above never see a half-working link.
 */
export function createPathLink(
  base: Link & { readonly rttMs?: number },
): PathLink & { readonly rttMs?: number } {
  const closeListeners = new Listeners<[Error | undefined]>()
  const switchable = new Map<ChannelName, SwitchableChannel>()
  const directs: MessageChannel[] = []
  let state: LinkState = base.state === 'closed' ? 'closed' : 'open'
  let path: PathInfo = base.path
  const close = (reason?: Error) => {
    if (state === 'closed') return
    state = 'closed'
    for (const ch of switchable.values()) ch.close(reason)
    for (const d of directs) (d as MessageChannel & { close?: (r?: Error) => void }).close?.(reason)
    base.close(reason)
    closeListeners.emit(reason)
    closeListeners.clear()
  }
  for (const name of DIRECT_CHANNELS)
    switchable.set(name, new SwitchableChannel(name, base.channel(name), close))
  base.onClose((reason) => close(reason))

  return {
    base,
    get peer() {
      return base.peer
    },
    get state() {
      return state
    },
    get path() {
      return path
    },
    get rttMs() {
      return base.rttMs
    },
    channel(name: ChannelName): MessageChannel {
      return switchable.get(name) ?? base.channel(name)
    },
    close,
    onClose(handler) {
      if (state === 'closed') {
        queueMicrotask(() => handler())
        return () => {}
      }
      return closeListeners.add(handler)
    },
    upgrade(direct, info) {
      if (state === 'closed') {
        for (const d of direct.values()) (d as MessageChannel & { close?: () => void }).close?.()
        return
      }
      for (const name of DIRECT_CHANNELS) {
        if (!direct.has(name)) throw new DirectPathError(`upgrade without a '${name}' stream`)
      }
      for (const [name, d] of direct) {
        directs.push(d)
        switchable.get(name)?.upgrade(d)
      }
      path = { ...base.path, direct: info.remote, bulk: info.via ?? 'tcp' }
    },
  }
}
