/**
 * Data-plane engine choice. Both engines build the same Link from the same Signaling and speak the same
 * wire protocol (a werift end and a libdatachannel end form one link), so members of one mesh may run
 * different engines.
 *
 * - 'werift' (default): pure TypeScript, nothing native. 5-14 MB/s per link on this kind of machine.
 * - 'libdatachannel': npm `node-datachannel` (native libdatachannel; its binary comes from the
 *   platform package `@node-datachannel/linux-x64-gnu`, no install script). Several times faster (see
 *   README / `npm run bench -- link --engine libdatachannel`), real PR-SCTP on the tunnel channel.
 *
 * Wiring (e.g. `mesh agent/join --engine E`):
 *   createMeshNode({ ..., linkFactory: linkFactoryFor(engine, init.webrtc) })
 * The native module is loaded only when 'libdatachannel' is chosen (when the factory is made).
 */
import { UsageError } from '../../../src/base/errors.ts'
import type { LinkFactory } from '../../interfaces.ts'
import type { Signaling, SignalMessage } from '../interfaces.ts'
import { createWebRtcLink, type WebRtcLinkOptions } from '../link.ts'

export type LinkEngine = 'werift' | 'libdatachannel'
export const LINK_ENGINES: readonly LinkEngine[] = ['werift', 'libdatachannel']
export const DEFAULT_LINK_ENGINE: LinkEngine = 'werift'

/** Options shared by both engines (the MeshNodeInit.webrtc shape). */
export type LinkEngineOptions = Omit<
  WebRtcLinkOptions,
  'peer' | 'initiator' | 'signaling' | 'iceServers' | 'signal'
>

/** Parses a CLI value; throws UsageError for anything else. */
export function parseLinkEngine(value: string): LinkEngine {
  if ((LINK_ENGINES as readonly string[]).includes(value)) return value as LinkEngine
  throw new UsageError(`unknown link engine '${value}' (expected ${LINK_ENGINES.join(' or ')})`)
}

/** A LinkFactory for net/node.ts using the chosen engine, with `opts` applied to every link. */
export function linkFactoryFor(engine: LinkEngine, opts: LinkEngineOptions = {}): LinkFactory {
  if (engine === 'werift') return (init) => createWebRtcLink({ ...opts, ...init })
  const loading = import('./link.ts')
  loading.catch(() => {}) // reported by the first link attempt instead
  return async (init) => {
    // Signaling messages that arrive while the native module loads must not be lost: hold them and
    // replay them to the link's handler when it subscribes (synchronously, at createNdcLink's start).
    const early: SignalMessage[] = []
    const offEarly = init.signaling.onMessage((m) => early.push(m))
    let mod: typeof import('./link.ts')
    try {
      mod = await loading
    } catch (err) {
      offEarly()
      throw err
    }
    const signaling: Signaling = {
      send: (m) => init.signaling.send(m),
      onMessage(handler) {
        offEarly()
        const off = init.signaling.onMessage(handler)
        for (const m of early.splice(0)) handler(m)
        return off
      },
    }
    try {
      return await mod.createNdcLink({ ...opts, ...init, signaling })
    } finally {
      offEarly()
    }
  }
}
