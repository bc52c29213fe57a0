import { chmodSync, mkdirSync, rmSync } from 'node:fs'
import { createServer, type Server, type Socket } from 'node:net'
import { dirname } from 'node:path'
import { describeError, MeshError } from '../base/errors.ts'
import { type Logger, silentLogger } from '../base/log.ts'
import {
  type CancelMessage,
  ControlProtocolError,
  decodeClientMessage,
  type ErrorBody,
  encode,
  LineSplitter,
  type RequestMessage,
  type ResponseMessage,
} from './v1/messages.ts'

export class UnknownMethodError extends MeshError {
  constructor(method: string) {
    super(`the agent has no method '${method}' (is the CLI newer than the agent?)`, {
      code: 'E_UNKNOWN_METHOD',
    })
  }
}

/** What a handler gets besides its params; E: the method's events (api.ts ControlEvent). */
export interface HandlerContext<E = unknown> {
  /** Streams one progress event to the caller. */
  emit(event: E): void
  /** Fires when the caller cancels or disconnects. */
  signal: AbortSignal
}

export type Handler = (params: unknown, ctx: HandlerContext) => Promise<unknown>

export interface ControlServerInit {
  /** Unix socket path. Its directory is created 0700 and the socket chmod 0600: owner-only. */
  path: string
  handlers: Record<string, Handler>
  log?: Logger
}

export interface ControlServer {
  start(): Promise<void>
  stop(): Promise<void>
}

function errorBody(err: unknown): ErrorBody {
  if (err instanceof MeshError) return { code: err.code, message: err.message, exitCode: err.exitCode }
  return { code: 'E_INTERNAL', message: describeError(err) }
}

/** The agent's local control API (see v1/messages.ts for the wire format). */
export function createControlServer(init: ControlServerInit): ControlServer {
  const log = init.log ?? silentLogger
  const sockets = new Set<Socket>()
  let server: Server | undefined

  function serve(socket: Socket): void {
    sockets.add(socket)
    socket.setEncoding('utf8')
    const inflight = new Map<number, AbortController>()
    const splitter = new LineSplitter()
    const write = (msg: ResponseMessage) => {
      if (!socket.destroyed) socket.write(encode(msg))
    }
    const run = (req: RequestMessage) => {
      const handler = Object.hasOwn(init.handlers, req.method) ? init.handlers[req.method] : undefined
      if (handler === undefined) {
        write({ v: 1, id: req.id, error: errorBody(new UnknownMethodError(req.method)) })
        return
      }
      const ac = new AbortController()
      inflight.set(req.id, ac)
      const ctx: HandlerContext = { emit: (event) => write({ v: 1, id: req.id, event }), signal: ac.signal }
      handler(req.params, ctx)
        .then(
          (result) => write({ v: 1, id: req.id, result: result ?? null }),
          (err: unknown) => {
            if (!(err instanceof MeshError)) log.warn(`control: ${req.method} failed: ${describeError(err)}`)
            write({ v: 1, id: req.id, error: errorBody(err) })
          },
        )
        .finally(() => inflight.delete(req.id))
    }
    socket.on('data', (chunk: string) => {
      try {
        splitter.push(chunk, (line) => {
          const msg: RequestMessage | CancelMessage = decodeClientMessage(line)
          if ('cancel' in msg) inflight.get(msg.id)?.abort(new Error('cancelled by the client'))
          else run(msg)
        })
      } catch (err) {
        // A malformed message ends this connection only; the agent keeps serving others.
        log.warn(`control: dropping client: ${describeError(err)}`)
        write({
          v: 1,
          id: 0,
          error: errorBody(
            err instanceof ControlProtocolError ? err : new ControlProtocolError(describeError(err)),
          ),
        })
        socket.end()
        // A client that never reads would keep the half-closed socket forever.
        setTimeout(() => socket.destroy(), 2000).unref()
      }
    })
    const abortAll = () => {
      for (const ac of inflight.values()) ac.abort(new Error('client disconnected'))
      inflight.clear()
      sockets.delete(socket)
    }
    socket.on('close', abortAll)
    socket.on('error', () => socket.destroy())
  }

  return {
    async start() {
      mkdirSync(dirname(init.path), { recursive: true, mode: 0o700 })
      // A socket file left by a killed agent would make listen() fail with EADDRINUSE.
      rmSync(init.path, { force: true })
      const srv = createServer(serve)
      await new Promise<void>((resolve, reject) => {
        srv.once('error', reject)
        // Restrictive umask window so the socket is never briefly world-connectable.
        const old = process.umask(0o177)
        try {
          srv.listen(init.path, () => {
            srv.off('error', reject)
            resolve()
          })
        } finally {
          process.umask(old)
        }
      })
      chmodSync(init.path, 0o600)
      server = srv
    },
    async stop() {
      const srv = server
      server = undefined
      if (srv === undefined) return
      for (const s of sockets) s.destroy()
      await new Promise<void>((resolve) => srv.close(() => resolve()))
      rmSync(init.path, { force: true })
    },
  }
}
