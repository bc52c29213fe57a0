import { connect, type Socket } from 'node:net'
import { onAbort } from '../base/abort.ts'
import { AbortError, MeshError } from '../base/errors.ts'
import type { ControlEvent, ControlMethod, ControlParams, ControlResult } from './api.ts'
import { decodeServerMessage, encode, LineSplitter, type ResponseMessage } from './v1/messages.ts'

/** The agent is not running (no socket) or refused us (permissions). */
export class AgentUnavailableError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_AGENT_UNAVAILABLE' })
  }
}

/** An error the agent returned for a call, carrying the agent's code and exit status. */
export class RemoteError extends MeshError {}

export interface CallOptions<E = unknown> {
  onEvent?: (event: E) => void
  signal?: AbortSignal
}

/** A method's arguments after its name: params may be left out when the method takes none. */
export type CallArgs<M extends ControlMethod> =
  Record<string, never> extends ControlParams<M>
    ? [params?: ControlParams<M>, options?: CallOptions<ControlEvent<M>>]
    : [params: ControlParams<M>, options?: CallOptions<ControlEvent<M>>]

export interface ControlClient {
  /** A method of the control API (api.ts): params, events and result typed. */
  call<M extends ControlMethod>(method: M, ...args: CallArgs<M>): Promise<ControlResult<M>>
  /** Any other name (tests ask for methods that do not exist); a known name never falls back here. */
  call<S extends string>(
    method: S extends ControlMethod ? never : S,
    params?: unknown,
    options?: CallOptions,
  ): Promise<unknown>
  close(): void
}

interface Pending {
  resolve(v: unknown): void
  reject(e: Error): void
  onEvent?: (event: unknown) => void
}

/** Connects to an agent's control socket. */
export async function connectControl(
  path: string,
  options: { signal?: AbortSignal } = {},
): Promise<ControlClient> {
  const socket: Socket = await new Promise((resolve, reject) => {
    const s = connect(path)
    const abortNow = () => s.destroy(new AbortError())
    const offAbort = onAbort(options.signal, abortNow)
    s.once('connect', () => {
      offAbort()
      resolve(s)
    })
    s.once('error', (err: NodeJS.ErrnoException) => {
      offAbort()
      const why =
        err.code === 'ENOENT' || err.code === 'ECONNREFUSED'
          ? `no agent is running for this state dir (no socket at ${path}); start one with 'mesh join' or 'mesh agent'`
          : err.code === 'EACCES'
            ? `permission denied on ${path}: the control socket belongs to the agent's owner`
            : `cannot reach the agent at ${path}: ${err.message}`
      reject(new AgentUnavailableError(why, { cause: err }))
    })
  })
  socket.setEncoding('utf8')
  let nextId = 1
  const pending = new Map<number, Pending>()
  const splitter = new LineSplitter()
  const failAll = (err: Error) => {
    for (const p of pending.values()) p.reject(err)
    pending.clear()
  }
  socket.on('data', (chunk: string) => {
    try {
      splitter.push(chunk, (line) => {
        const msg: ResponseMessage = decodeServerMessage(line)
        const p = pending.get(msg.id)
        if (p === undefined) {
          if ('error' in msg && msg.id === 0)
            failAll(new RemoteError(msg.error.message, { code: msg.error.code }))
          return
        }
        if ('event' in msg) p.onEvent?.(msg.event)
        else {
          pending.delete(msg.id)
          if ('result' in msg) p.resolve(msg.result)
          else
            p.reject(
              new RemoteError(msg.error.message, { code: msg.error.code, exitCode: msg.error.exitCode }),
            )
        }
      })
    } catch (err) {
      failAll(err as Error)
      socket.destroy()
    }
  })
  socket.on('close', () => failAll(new AgentUnavailableError('the agent closed the control connection')))
  socket.on('error', () => {})

  const call = (method: string, params: unknown = {}, opts: CallOptions = {}): Promise<unknown> => {
    const id = nextId++
    return new Promise((resolve, reject) => {
      if (opts.signal?.aborted === true) return reject(new AbortError())
      const abortNow = () => {
        if (!socket.destroyed) socket.write(encode({ v: 1, id, cancel: true }))
      }
      const offAbort = onAbort(opts.signal, abortNow)
      const done = () => offAbort()
      pending.set(id, {
        resolve: (v) => {
          done()
          resolve(v)
        },
        reject: (e) => {
          done()
          reject(e)
        },
        onEvent: opts.onEvent,
      })
      socket.write(encode({ v: 1, id, method, params }))
    })
  }
  return {
    // One implementation for both overloads: the types are the only difference.
    call: call as ControlClient['call'],
    close() {
      socket.end()
    },
  }
}
