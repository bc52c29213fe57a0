/**
 * The adapter from the overlay's links (net/link) to what migration sees: the 'migrate' channel of
 * each link. Only net/link's own interfaces are imported; nothing of libp2p or werift.
 */
import type { Link, MessageChannel, Overlay } from '../../net/link/interfaces.ts'
import type { MigrationChannel, MigrationNetwork } from './interfaces.ts'

const wrapped = new WeakMap<MessageChannel, MigrationChannel>()

function wrap(link: Link): MigrationChannel {
  const ch = link.channel('migrate')
  let w = wrapped.get(ch)
  if (w === undefined) {
    w = {
      peer: link.peer,
      get open() {
        return ch.state === 'open' && link.state !== 'closed'
      },
      send: (m) => ch.send(m),
      drain: (signal) => ch.onDrain(signal ? { signal } : {}),
      onMessage: (h) => ch.onMessage(h),
      onClose: (h) => ch.onClose(h),
    }
    wrapped.set(ch, w)
  }
  return w
}

export function overlayMigrationNetwork(overlay: Overlay): MigrationNetwork {
  return {
    self: overlay.self,
    channel(peer) {
      const l = overlay.link(peer)
      return l === undefined || l.state === 'closed' ? undefined : wrap(l)
    },
    channels: () =>
      overlay
        .links()
        .filter((l) => l.state !== 'closed')
        .map(wrap),
    onChannel: (handler) => overlay.onLink((l) => handler(wrap(l))),
  }
}
