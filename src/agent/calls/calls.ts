import type { Link, Overlay } from '../../../net/link/interfaces.ts'
import { openLink } from '../../../net/link/open.ts'
import { linkedController, onAbort } from '../../base/abort.ts'
import { AbortError, describeError, MeshError } from '../../base/errors.ts'
import type { Logger } from '../../base/log.ts'
import type { AgentService } from '../interfaces.ts'
import { type CallMessage, decodeCall, encodeCall, isCallMessage } from './v1/messages.ts'

/** A call to a member failed: no link, no answer in time, or the member answered with an error. */
export class PeerCallError extends MeshError {}

export interface PeerCallContext {
  /** The calling member's PeerId. */
  peer: string
  /** Fires when the link closes or this agent stops. */
  signal: AbortSignal
}

export type PeerCallHandler = (params: unknown, ctx: PeerCallContext) => Promise<unknown>

export interface CallOptions {
  /** Default 5 s: a member that does not answer by then is treated as gone. */
  timeoutMs?: number
  signal?: AbortSignal
}

export interface AgentCalls extends AgentService {
  /** Adds methods members may call on this agent (before start()). */
  register(handlers: Record<string, PeerCallHandler>): void
  call(peer: string, method: string, params?: unknown, options?: CallOptions): Promise<unknown>
  /** Members with an open link now. */
  peers(): string[]
}

export interface AgentCallsInit {
  /** The overlay exists once the net service started (a getter, like the chunk service's). */
  overlay: () => Overlay
  /** Only members may call (the overlay links only members; a revoked one may linger a moment). */
  isMember: (peer: string) => boolean
  log: Logger
}

interface Pending {
  peer: string
  resolve(v: unknown): void
  reject(e: Error): void
}

/**
 * Request/response calls between agents over each link's 'control' channel (v1/messages.ts): what one
 * agent asks another that is neither chunks nor migration (capacity for placement, reservations,
 * standby syncs). A handler's error travels back as the call's error; a bad message is dropped with a
 * warning and never reaches a handler.
 */
export function createAgentCalls(init: AgentCallsInit): AgentCalls {
  const { log } = init
  const handlers = new Map<string, PeerCallHandler>()
  const pending = new Map<number, Pending>()
  /** Handlers running for members' calls, by `peer/id`, so a 'cancel' can abort them. */
  const serving = new Map<string, AbortController>()
  const offs: (() => void)[] = []
  let ac = new AbortController()
  let nextId = 1
  let overlay: Overlay | undefined

  const send = (link: Link, m: CallMessage): boolean => {
    try {
      link.channel('control').send(encodeCall(m))
      return true
    } catch (err) {
      log.debug('agent call: send failed', { peer: link.peer, error: describeError(err) })
      return false
    }
  }

  const serve = (link: Link, id: number, method: string, params: unknown) => {
    const h = handlers.get(method)
    if (h === undefined) {
      send(link, {
        t: 'res',
        id,
        ok: false,
        error: { code: 'E_UNKNOWN_METHOD', message: `this agent has no call '${method}' (older version?)` },
      })
      return
    }
    const ctl = new AbortController()
    const key = `${link.peer}/${id}`
    serving.set(key, ctl)
    const offStop = onAbort(ac.signal, () => ctl.abort(new AbortError('agent stopping')))
    const offClose = link.onClose(() => ctl.abort(new AbortError('link closed')))
    h(params, { peer: link.peer, signal: ctl.signal })
      .then(
        (result) => send(link, { t: 'res', id, ok: true, result: result ?? null }),
        (err: unknown) =>
          send(link, {
            t: 'res',
            id,
            ok: false,
            error: {
              code: err instanceof MeshError ? err.code : 'E_INTERNAL',
              message: describeError(err),
            },
          }),
      )
      .finally(() => {
        if (serving.get(key) === ctl) serving.delete(key)
        offStop()
        offClose()
      })
  }

  const attach = (link: Link) => {
    const ch = link.channel('control')
    const off = ch.onMessage((bytes) => {
      if (!isCallMessage(bytes)) return
      let m: CallMessage
      try {
        m = decodeCall(bytes)
      } catch (err) {
        log.warn('dropping a bad agent call', { peer: link.peer, error: describeError(err) })
        return
      }
      if (m.t === 'cancel') {
        serving.get(`${link.peer}/${m.id}`)?.abort(new AbortError('the caller cancelled'))
        return
      }
      if (m.t === 'req') {
        if (!init.isMember(link.peer)) {
          send(link, {
            t: 'res',
            id: m.id,
            ok: false,
            error: { code: 'E_NOT_MEMBER', message: 'not a member' },
          })
          return
        }
        serve(link, m.id, m.method, m.params)
        return
      }
      const p = pending.get(m.id)
      // A response from another peer than the one asked is not an answer (ids are ours, per sender).
      if (p === undefined || p.peer !== link.peer) return
      pending.delete(m.id)
      if (m.ok) p.resolve(m.result)
      else p.reject(new PeerCallError(`${link.peer}: ${m.error.message}`, { code: m.error.code }))
    })
    const offClose = link.onClose(() => {
      off()
      offClose()
    })
    offs.push(off, offClose)
  }

  return {
    name: 'calls',
    register(hs) {
      for (const [k, h] of Object.entries(hs)) {
        if (handlers.has(k)) throw new MeshError(`two handlers for agent call '${k}'`)
        handlers.set(k, h)
      }
    },
    async start(signal) {
      // Follows the agent's lifetime; stop() aborts it, which also drops the listener on `signal`.
      ac = linkedController(signal).controller
      overlay = init.overlay()
      for (const l of overlay.links()) attach(l)
      offs.push(overlay.onLink(attach))
    },
    async stop() {
      ac.abort(new AbortError('agent stopping'))
      for (const off of offs.splice(0)) off()
      for (const p of pending.values()) p.reject(new PeerCallError('agent stopping', { code: 'E_ABORTED' }))
      pending.clear()
    },
    handlers: () => ({}),
    peers() {
      return (overlay?.links() ?? []).filter((l) => l.state === 'open').map((l) => l.peer)
    },
    async call(peer, method, params = {}, options = {}) {
      let link: Link | undefined
      try {
        // Built on demand when the overlay keeps no link to this member (large meshes).
        link =
          overlay === undefined
            ? undefined
            : await openLink(overlay, peer, {
                // the link build gets the call's own time (a down member fails as fast as before)
                timeoutMs: Math.max(options.timeoutMs ?? 5000, 10_000),
                ...(options.signal ? { signal: options.signal } : {}),
              })
      } catch (err) {
        if (err instanceof AbortError) throw err
        throw new PeerCallError(`no open link to ${peer}: ${describeError(err)}`, {
          code: 'E_NO_LINK',
          cause: err,
        })
      }
      if (link === undefined || link.state !== 'open')
        throw new PeerCallError(`no open link to ${peer}`, { code: 'E_NO_LINK' })
      return callOver(link, peer, method, params, options)
    },
  }

  function callOver(
    link: Link,
    peer: string,
    method: string,
    params: unknown,
    options: { signal?: AbortSignal; timeoutMs?: number },
  ): Promise<unknown> {
    const id = nextId++
    const timeoutMs = options.timeoutMs ?? 5000
    return new Promise<unknown>((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer)
        pending.delete(id)
        offAbort()
        offClose()
      }
      const timer = setTimeout(() => {
        cleanup()
        send(link, { t: 'cancel', id })
        reject(
          new PeerCallError(`${peer} did not answer ${method} within ${timeoutMs} ms`, {
            code: 'E_TIMEOUT',
          }),
        )
      }, timeoutMs)
      const offClose = link.onClose(() => {
        cleanup()
        reject(new PeerCallError(`link to ${peer} closed during ${method}`, { code: 'E_NO_LINK' }))
      })
      const offAbort = onAbort(options.signal, (reason) => {
        cleanup()
        send(link, { t: 'cancel', id })
        reject(new AbortError(`call ${method} to ${peer} cancelled`, { cause: reason }))
      })
      pending.set(id, {
        peer,
        resolve: (v) => {
          cleanup()
          resolve(v)
        },
        reject: (e) => {
          cleanup()
          reject(e)
        },
      })
      if (options.signal?.aborted === true) return // offAbort's callback rejects it
      if (!send(link, { t: 'req', id, method, params }))
        pending.get(id)?.reject(new PeerCallError(`cannot send ${method} to ${peer}`, { code: 'E_NO_LINK' }))
    })
  }
}
