/**
 * Spot notices: what a provider says before it takes a host away, and where the agent hears it.
 *
 * `mesh agent --spot SOURCE` picks one watcher (watchers/*.ts), each speaking its provider's documented
 * metadata protocol. A watcher calls back once per distinct notice; the spot service decides what to do
 * (evacuate on a termination notice, report a rebalance hint).
 */
import { onAbort } from '../../base/abort.ts'
import { MeshError, UsageError } from '../../base/errors.ts'
import type { Logger } from '../../base/log.ts'

export class SpotError extends MeshError {}

/** The metadata endpoint refused or garbled an answer (kept polling; reported when it persists). */
export class MetadataError extends SpotError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_SPOT_METADATA' })
  }
}

export type SpotProvider = 'aws' | 'gcp' | 'azure' | 'url' | 'file'

export type NoticeKind = 'terminate' | 'stop' | 'hibernate' | 'preempt' | 'rebalance'

export interface Notice {
  provider: SpotProvider
  kind: NoticeKind
  /** Stable per notice (Azure's EventId, AWS's action+time, ...): the same notice seen twice is one. */
  id: string
  /** When this agent learned of it (ms since the epoch). */
  receivedAt: number
  /** When the host goes away (ms since the epoch): the provider's word when it gives one, else
   *  receivedAt + the provider's documented notice (GCP 30 s) or --spot-window. Absent for a rebalance
   *  hint (AWS: "at elevated risk", no time). */
  deadlineAt?: number
  /** What the provider said, one line, for logs and reports. */
  detail: string
}

export interface WatcherInit {
  /** Base URL of the metadata service (default http://169.254.169.254, the documented address). */
  endpoint?: string
  /** Poll interval (AWS documents 5 s; GCP long-polls; Azure and url/file default 1 s). */
  pollMs?: number
  /** Assumed time from notice to shutdown when the provider gives none (default 30 s). */
  windowMs?: number
  /** Each HTTP request's timeout (long-polls add their own wait). Default 2 s. */
  requestTimeoutMs?: number
  /** Where warnings go (an endpoint that refuses or is unreachable), rate-limited by the watcher. */
  log?: Logger
  now?: () => number
}

/** A notice source. run() polls until the signal fires; it never throws for a flaky endpoint. */
export interface NoticeWatcher {
  readonly provider: SpotProvider
  /** One line: where it listens. */
  readonly describe: string
  /** `onClear(id)`: a notice was withdrawn (the file went away, the URL answers 404 again, Azure dropped
   *  the event, AWS's instance-action is 404 again). */
  run(onNotice: (notice: Notice) => void, signal: AbortSignal, onClear?: (id: string) => void): Promise<void>
  /** Tells the provider the host is ready to go (Azure: StartRequests); a no-op elsewhere. */
  acknowledge?(notice: Notice, signal?: AbortSignal): Promise<void>
}

export type SpotSource =
  | { provider: 'aws' | 'gcp' | 'azure'; endpoint?: string }
  | { provider: 'url'; url: string }
  | { provider: 'file'; path: string }

export const METADATA_ENDPOINT = 'http://169.254.169.254'

/** Parses `aws|gcp|azure|url:URL|file:PATH` (the `--spot` option). */
export function parseSpotSource(value: string): SpotSource {
  const v = value.trim()
  if (v === 'aws' || v === 'gcp' || v === 'azure') return { provider: v }
  if (v.startsWith('url:')) {
    const url = v.slice(4)
    let u: URL
    try {
      u = new URL(url)
    } catch {
      throw new UsageError(`--spot url:URL needs an http(s) URL, got '${url}'`)
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:')
      throw new UsageError(`--spot url:URL needs an http(s) URL, got '${url}'`)
    return { provider: 'url', url }
  }
  if (v.startsWith('file:')) {
    const path = v.slice(5)
    if (path === '' || path.includes('\0')) throw new UsageError('--spot file:PATH needs a path')
    return { provider: 'file', path }
  }
  throw new UsageError(`--spot must be aws, gcp, azure, url:URL or file:PATH, got '${value}'`)
}

/**
 * The body a url:/file: source may carry when it announces a notice: empty (a notice, deadline after
 * --spot-window), or JSON `{"time": ISO-8601}` or `{"seconds": N}` (left until shutdown), optionally
 * `"kind"` and `"id"`.
 */
export function parseGenericNotice(
  provider: 'url' | 'file',
  body: string,
  receivedAt: number,
  windowMs: number,
): Notice {
  const text = body.trim()
  let o: Record<string, unknown> = {}
  if (text !== '') {
    try {
      const parsed = JSON.parse(text) as unknown
      if (typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed))
        o = parsed as Record<string, unknown>
      else throw new Error('not an object')
    } catch (cause) {
      throw new MetadataError(`${provider} notice body must be empty or a JSON object`, { cause })
    }
  }
  let deadlineAt = receivedAt + windowMs
  if (typeof o.time === 'string') {
    const t = Date.parse(o.time)
    if (!Number.isFinite(t)) throw new MetadataError(`${provider} notice: bad time '${o.time.slice(0, 64)}'`)
    deadlineAt = t
  } else if (o.seconds !== undefined) {
    if (typeof o.seconds !== 'number' || !Number.isFinite(o.seconds) || o.seconds < 0 || o.seconds > 86_400)
      throw new MetadataError(`${provider} notice: seconds must be a number from 0 to 86400`)
    deadlineAt = receivedAt + o.seconds * 1000
  }
  const kinds: NoticeKind[] = ['terminate', 'stop', 'hibernate', 'preempt', 'rebalance']
  const kind =
    typeof o.kind === 'string' && kinds.includes(o.kind as NoticeKind) ? (o.kind as NoticeKind) : 'terminate'
  // Stable across polls: the same file or URL answer seen again is the same notice.
  const id =
    typeof o.id === 'string'
      ? o.id.slice(0, 128)
      : typeof o.time === 'string'
        ? `${provider}:${deadlineAt}`
        : `${provider}:${kind}`
  return {
    provider,
    kind,
    id,
    receivedAt,
    ...(kind === 'rebalance' ? {} : { deadlineAt }),
    detail: `${kind} at ${new Date(deadlineAt).toISOString()}`,
  }
}

/** Reads at most `max` bytes of a response body (a metadata answer is small; never buffer without end). */
export async function readBody(res: Response, max = 64 * 1024): Promise<string> {
  const reader = res.body?.getReader()
  if (reader === undefined) return ''
  const chunks: Uint8Array[] = []
  let n = 0
  for (;;) {
    const { done, value } = await reader.read()
    if (done) break
    n += value.byteLength
    if (n > max) {
      await reader.cancel().catch(() => {})
      throw new MetadataError(`metadata answer longer than ${max} bytes`)
    }
    chunks.push(value)
  }
  return Buffer.concat(chunks).toString('utf8')
}

/** Sleeps ms, or less when the signal fires (never rejects). */
export function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve()
    const done = () => {
      clearTimeout(timer)
      offAbort()
      resolve()
    }
    const timer = setTimeout(done, ms)
    const offAbort = onAbort(signal, done)
  })
}

/** Logs a failing endpoint once, then once a minute while it keeps failing; says when it recovers. */
export function flakyReporter(
  what: string,
  log: Logger | undefined,
  now: () => number = Date.now,
): { fail(err: unknown): void; ok(): void } {
  let failingSince: number | undefined
  let lastWarn = Number.NEGATIVE_INFINITY
  return {
    fail(err) {
      const t = now()
      failingSince ??= t
      if (t - lastWarn >= 60_000) {
        lastWarn = t
        log?.warn(`${what}: ${err instanceof Error ? err.message : String(err)} (still polling)`)
      }
    },
    ok() {
      if (failingSince !== undefined) log?.warn(`${what}: answering again`)
      failingSince = undefined
      lastWarn = Number.NEGATIVE_INFINITY
    },
  }
}
