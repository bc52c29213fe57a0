import { EventEmitter } from 'node:events'
import { createConnection, type Socket } from 'node:net'
import { onAbort } from '../../src/base/abort.ts'
import { AbortError } from '../../src/base/errors.ts'
import { QmpError, QmpProtocolError } from '../errors.ts'

/** An asynchronous QMP event (`STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`...). */
export interface QmpEvent {
  event: string
  data: Record<string, unknown>
  timestamp?: { seconds: number; microseconds: number }
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package?: string }
  capabilities: string[]
}

export interface QmpOptions {
  /** Per-command default timeout, ms. */
  timeoutMs?: number
  /** Longest line accepted from QEMU; a longer one is a protocol error (closes the connection). */
  maxLineBytes?: number
}

export interface ExecuteOptions {
  timeoutMs?: number
  signal?: AbortSignal
}

interface Pending {
  command: string
  resolve: (v: unknown) => void
  reject: (e: Error) => void
  cleanup: () => void
}

/**
 * Events: `event` (QmpEvent) for every QMP event, and `close` (Error | undefined) once the connection
 * ends. Pending commands fail with QmpProtocolError when the connection closes.
 */
export interface QmpClientEvents {
  event: [QmpEvent]
  close: [Error | undefined]
}

/**
 * A QMP client over a unix socket. Lines are decoded defensively: a line longer than `maxLineBytes` or
 * one that is not a JSON object closes the connection with a QmpProtocolError instead of crashing.
 */
export class QmpClient extends EventEmitter<QmpClientEvents> {
  readonly greeting: QmpGreeting
  private readonly socket: Socket
  private readonly pending = new Map<string, Pending>()
  private readonly timeoutMs: number
  private nextId = 1
  private closed = false
  private closeError: Error | undefined

  private constructor(socket: Socket, greeting: QmpGreeting, timeoutMs: number) {
    super()
    this.socket = socket
    this.greeting = greeting
    this.timeoutMs = timeoutMs
  }

  /**
   * Connects, reads the greeting and negotiates capabilities. Fails with QmpProtocolError when the socket
   * is not there, nothing answers in time, or the greeting is not QMP.
   */
  static async connect(
    path: string,
    options: QmpOptions & { signal?: AbortSignal } = {},
  ): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? 30_000
    const maxLine = options.maxLineBytes ?? 4 * 1024 * 1024
    const socket = createConnection({ path })
    let client: QmpClient | undefined
    const lines = new LineDecoder(maxLine)
    let onGreeting: ((msg: Record<string, unknown>) => void) | undefined
    let failGreeting: ((err: Error) => void) | undefined

    const handle = (line: string) => {
      let msg: unknown
      try {
        msg = JSON.parse(line)
      } catch (err) {
        throw new QmpProtocolError(`QMP: bad JSON from QEMU: ${line.slice(0, 80)}`, { cause: err })
      }
      if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
        throw new QmpProtocolError(`QMP: expected a JSON object, got: ${line.slice(0, 80)}`)
      }
      const obj = msg as Record<string, unknown>
      if (client === undefined) onGreeting?.(obj)
      else client.dispatch(obj)
    }
    socket.on('data', (buf: Buffer) => {
      try {
        for (const line of lines.push(buf)) handle(line)
      } catch (err) {
        const e = err instanceof Error ? err : new QmpProtocolError(String(err))
        if (client !== undefined) client.fail(e)
        else failGreeting?.(e)
        socket.destroy()
      }
    })

    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(
        () => done(new QmpProtocolError(`QMP: no greeting on ${path} in ${timeoutMs} ms`)),
        timeoutMs,
      )
      const abortNow = () => done(new AbortError('QMP connect aborted', { cause: options.signal?.reason }))
      const onError = (err: Error) =>
        done(new QmpProtocolError(`QMP: cannot connect to ${path}: ${err.message}`, { cause: err }))
      const onClose = () => done(new QmpProtocolError(`QMP: ${path} closed before the greeting`))
      const done = (err: Error | undefined, g?: QmpGreeting) => {
        clearTimeout(timer)
        offAbort()
        socket.off('error', onError)
        socket.off('close', onClose)
        onGreeting = undefined
        failGreeting = undefined
        if (err !== undefined) {
          socket.destroy()
          reject(err)
        } else resolve(g!)
      }
      const offAbort = onAbort(options.signal, abortNow) // an aborted signal ends it in a microtask
      socket.on('error', onError)
      socket.on('close', onClose)
      failGreeting = (err) => done(err)
      onGreeting = (obj) => {
        const qmp = obj.QMP as QmpGreeting | undefined
        if (typeof qmp !== 'object' || qmp === null) {
          done(new QmpProtocolError(`QMP: ${path} did not greet with QMP`))
          return
        }
        done(undefined, qmp)
      }
    })

    client = new QmpClient(socket, greeting, timeoutMs)
    socket.on('error', (err) =>
      client?.fail(new QmpProtocolError(`QMP: socket error: ${err.message}`, { cause: err })),
    )
    socket.on('close', () => client?.fail(undefined))
    try {
      await client.execute('qmp_capabilities', undefined, options)
    } catch (err) {
      client.close()
      throw err
    }
    return client
  }

  get isClosed(): boolean {
    return this.closed
  }

  /** Runs a command; resolves with its `return` value, rejects with QmpError carrying QEMU's class/desc. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: ExecuteOptions = {},
  ): Promise<T> {
    if (this.closed) {
      return Promise.reject(
        new QmpProtocolError(`QMP ${command}: connection closed`, { cause: this.closeError }),
      )
    }
    if (options.signal?.aborted === true) {
      return Promise.reject(new AbortError(`QMP ${command} aborted`, { cause: options.signal.reason }))
    }
    const id = `m${this.nextId++}`
    const timeoutMs = options.timeoutMs ?? this.timeoutMs
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id)
        cleanup()
        reject(new QmpProtocolError(`QMP ${command}: no answer in ${timeoutMs} ms`))
      }, timeoutMs)
      const abortNow = () => {
        // QEMU will still answer; the answer is dropped because the id is no longer pending.
        this.pending.delete(id)
        cleanup()
        reject(new AbortError(`QMP ${command} aborted`, { cause: options.signal?.reason }))
      }
      const cleanup = () => {
        clearTimeout(timer)
        offAbort()
      }
      const offAbort = onAbort(options.signal, abortNow)
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, cleanup })
      const msg: Record<string, unknown> = { execute: command, id }
      if (args !== undefined) msg.arguments = args
      this.socket.write(`${JSON.stringify(msg)}\n`)
    })
  }

  /** Resolves with the first event named `name` for which `match` holds; rejects on timeout/close/abort. */
  waitEvent(
    name: string,
    options: ExecuteOptions & { match?: (e: QmpEvent) => boolean } = {},
  ): Promise<QmpEvent> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs
    return new Promise<QmpEvent>((resolve, reject) => {
      if (this.closed) {
        reject(
          new QmpProtocolError(`QMP: connection closed while waiting for ${name}`, {
            cause: this.closeError,
          }),
        )
        return
      }
      const timer = setTimeout(
        () => done(new QmpProtocolError(`QMP: no ${name} event in ${timeoutMs} ms`)),
        timeoutMs,
      )
      const onEvent = (e: QmpEvent) => {
        if (e.event === name && (options.match === undefined || options.match(e))) done(undefined, e)
      }
      const onClose = (err: Error | undefined) =>
        done(new QmpProtocolError(`QMP: connection closed while waiting for ${name}`, { cause: err }))
      const abortNow = () =>
        done(new AbortError(`waiting for ${name} aborted`, { cause: options.signal?.reason }))
      const done = (err: Error | undefined, e?: QmpEvent) => {
        clearTimeout(timer)
        this.off('event', onEvent)
        this.off('close', onClose)
        offAbort()
        if (err !== undefined) reject(err)
        else resolve(e!)
      }
      const offAbort = onAbort(options.signal, abortNow) // an aborted signal ends it in a microtask
      this.on('event', onEvent)
      this.on('close', onClose)
    })
  }

  close(): void {
    this.socket.destroy()
    this.fail(undefined)
  }

  private dispatch(msg: Record<string, unknown>): void {
    if (typeof msg.event === 'string') {
      const data =
        typeof msg.data === 'object' && msg.data !== null ? (msg.data as Record<string, unknown>) : {}
      const ev: QmpEvent = { event: msg.event, data }
      if (typeof msg.timestamp === 'object' && msg.timestamp !== null) {
        ev.timestamp = msg.timestamp as QmpEvent['timestamp']
      }
      this.emit('event', ev)
      return
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined
    const p = id === undefined ? undefined : this.pending.get(id)
    if (p === undefined) return // an answer to an aborted/timed-out command, or one without our id
    this.pending.delete(id!)
    p.cleanup()
    if ('return' in msg) {
      p.resolve(msg.return)
      return
    }
    const error = msg.error as { class?: unknown; desc?: unknown } | undefined
    if (typeof error === 'object' && error !== null) {
      p.reject(new QmpError(p.command, String(error.class ?? 'GenericError'), String(error.desc ?? '')))
      return
    }
    p.reject(new QmpProtocolError(`QMP ${p.command}: answer has neither return nor error`))
  }

  private fail(err: Error | undefined): void {
    if (this.closed) return
    this.closed = true
    this.closeError = err
    this.socket.destroy()
    for (const [id, p] of this.pending) {
      this.pending.delete(id)
      p.cleanup()
      p.reject(
        err ?? new QmpProtocolError(`QMP ${p.command}: connection closed before the answer (did QEMU exit?)`),
      )
    }
    this.emit('close', err)
  }
}

/** Splits a byte stream into lines, refusing lines longer than the limit. */
export class LineDecoder {
  private parts: Buffer[] = []
  private length = 0
  constructor(private readonly maxLine: number) {}

  push(buf: Buffer): string[] {
    const out: string[] = []
    let start = 0
    for (;;) {
      const nl = buf.indexOf(0x0a, start)
      if (nl === -1) break
      const piece = buf.subarray(start, nl)
      this.check(piece.length)
      const line = this.parts.length === 0 ? piece : Buffer.concat([...this.parts, piece])
      this.parts = []
      this.length = 0
      const text = line.toString('utf8').trim()
      if (text !== '') out.push(text)
      start = nl + 1
    }
    if (start < buf.length) {
      const rest = buf.subarray(start)
      this.check(rest.length)
      this.parts.push(Buffer.from(rest))
      this.length += rest.length
    }
    return out
  }

  private check(add: number): void {
    if (this.length + add > this.maxLine) {
      throw new QmpProtocolError(`QMP: line longer than ${this.maxLine} bytes`)
    }
  }
}
