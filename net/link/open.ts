/** Getting a link to a member whether or not the overlay keeps one open all the time. */
import type { Link, Overlay } from './interfaces.ts'

/** The open link to `peer`: the one there is, else one built on demand where the overlay can; undefined
 *  when neither. */
export async function openLink(
  overlay: Overlay,
  peer: string,
  options: { signal?: AbortSignal; timeoutMs?: number } = {},
): Promise<Link | undefined> {
  // connect() also when a link is open: it marks the link as wanted, which keeps an on-demand link open.
  if (overlay.connect !== undefined) return overlay.connect(peer, options)
  const l = overlay.link(peer)
  return l?.state === 'open' ? l : undefined
}
