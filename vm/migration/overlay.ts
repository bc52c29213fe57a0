/**
 * The adapter from the overlay's links (net/link) to what migration sees: the 'migrate' channel of
 * each link. Only net/link's own interfaces are imported; nothing of libp2p or werift.
 */
import type { Link, MessageChannel, Overlay } from '../../net/link/interfaces.ts'
import { openLink } from '../../net/link/open.ts'
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

/**
 * `overlay` may be a getter: the agent's overlay node exists only once its net service started (before
 * the migration service starts), so the agent can build this adapter up front.
 */
export function overlayMigrationNetwork(overlay: Overlay | (() => Overlay)): MigrationNetwork {
  const get = typeof overlay === 'function' ? overlay : () => overlay
  return {
    get self() {
      return get().self
    },
    channel(peer) {
      const l = get().link(peer)
      return l === undefined || l.state === 'closed' ? undefined : wrap(l)
    },
    channels: () =>
      get()
        .links()
        .filter((l) => l.state !== 'closed')
        .map(wrap),
    onChannel: (handler) => get().onLink((l) => handler(wrap(l))),
    async connect(peer, signal) {
      // A failure shows as channel(peer) === undefined, which the caller already reports.
      await openLink(get(), peer, { timeoutMs: 15_000, ...(signal === undefined ? {} : { signal }) }).catch(
        () => undefined,
      )
    },
  }
}
