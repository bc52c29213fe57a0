/**
 * Notice watchers, one per provider, each speaking the provider's documented metadata protocol:
 *
 * - AWS (IMDSv2): `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`, then GETs with
 *   `X-aws-ec2-metadata-token` of `/latest/meta-data/spot/instance-action` (404 until a notice, then
 *   `{"action":"terminate|stop|hibernate","time":ISO}`) and `/latest/meta-data/events/recommendations/
 *   rebalance` (`{"noticeTime":ISO}`), every 5 s as AWS advises. A 401 means the token expired: a new one.
 * - GCP: `GET /computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google`, answered `TRUE` or
 *   `FALSE`; then `?wait_for_change=true&last_etag=E` blocks until the value changes. Spot VMs get 30 s.
 * - Azure Scheduled Events: `GET /metadata/scheduledevents?api-version=2020-07-01` with `Metadata: true`;
 *   an event of type `Preempt` whose `Resources` name this VM (from `/metadata/instance/compute/name`) is
 *   the notice, `NotBefore` its deadline; acknowledge() POSTs `{"StartRequests":[{"EventId":…}]}`.
 * - url:URL: GET; 200 is a notice (body: see parseGenericNotice), 404/204 none. file:PATH: the file exists.
 */
import { readFile } from 'node:fs/promises'
import { AbortError } from '../../base/errors.ts'
import {
  flakyReporter,
  METADATA_ENDPOINT,
  MetadataError,
  type Notice,
  type NoticeWatcher,
  parseGenericNotice,
  pause,
  readBody,
  type SpotSource,
  type WatcherInit,
} from './notice.ts'

interface HttpAnswer {
  status: number
  body: string
  headers: Headers
}

async function request(
  url: string,
  init: { method?: string; headers?: Record<string, string>; body?: string; timeoutMs: number },
  signal: AbortSignal,
): Promise<HttpAnswer> {
  const sig = AbortSignal.any([signal, AbortSignal.timeout(init.timeoutMs)])
  let res: Response
  try {
    res = await fetch(url, {
      method: init.method ?? 'GET',
      ...(init.headers === undefined ? {} : { headers: init.headers }),
      ...(init.body === undefined ? {} : { body: init.body }),
      signal: sig,
      redirect: 'error',
    })
  } catch (cause) {
    if (signal.aborted) throw new AbortError('watcher stopped', { cause })
    const why = sig.aborted ? `no answer within ${init.timeoutMs} ms` : describeFetchError(cause)
    throw new MetadataError(`${init.method ?? 'GET'} ${url}: ${why}`, { cause })
  }
  return { status: res.status, body: await readBody(res), headers: res.headers }
}

function describeFetchError(err: unknown): string {
  const cause = (err as { cause?: { code?: string; message?: string } }).cause
  return cause?.code ?? cause?.message ?? (err as Error).message
}

const AWS_TTL_S = 21_600
const AWS_TOKEN_HEADER = 'X-aws-ec2-metadata-token'

export function awsWatcher(init: WatcherInit = {}): NoticeWatcher {
  const base = init.endpoint ?? METADATA_ENDPOINT
  const now = init.now ?? Date.now
  const pollMs = init.pollMs ?? 5000
  const timeoutMs = init.requestTimeoutMs ?? 2000
  let token: { value: string; until: number } | undefined
  const getToken = async (signal: AbortSignal): Promise<string> => {
    if (token !== undefined && now() < token.until) return token.value
    const r = await request(
      `${base}/latest/api/token`,
      { method: 'PUT', headers: { 'X-aws-ec2-metadata-token-ttl-seconds': String(AWS_TTL_S) }, timeoutMs },
      signal,
    )
    if (r.status !== 200 || r.body.trim() === '' || r.body.length > 4096)
      throw new MetadataError(`IMDSv2 token request answered ${r.status}`)
    // Renew a minute early: a token that expires between two polls costs a 401 and a retry.
    token = { value: r.body.trim(), until: now() + (AWS_TTL_S - 60) * 1000 }
    return token.value
  }
  const get = async (path: string, signal: AbortSignal): Promise<HttpAnswer> => {
    for (let attempt = 0; ; attempt++) {
      const r = await request(
        `${base}${path}`,
        { headers: { [AWS_TOKEN_HEADER]: await getToken(signal) }, timeoutMs },
        signal,
      )
      if (r.status === 401 && attempt === 0) {
        token = undefined
        continue
      }
      return r
    }
  }
  const parseTime = (v: unknown, what: string): number => {
    const t = typeof v === 'string' ? Date.parse(v) : Number.NaN
    if (!Number.isFinite(t)) throw new MetadataError(`${what}: bad time ${JSON.stringify(v)?.slice(0, 64)}`)
    return t
  }
  const json = (body: string, what: string): Record<string, unknown> => {
    try {
      const o = JSON.parse(body) as unknown
      if (typeof o === 'object' && o !== null && !Array.isArray(o)) return o as Record<string, unknown>
    } catch {}
    throw new MetadataError(`${what}: not a JSON object`)
  }
  return {
    provider: 'aws',
    describe: `AWS IMDSv2 at ${base} (spot/instance-action, rebalance)`,
    async run(onNotice, signal, onClear) {
      const flaky = flakyReporter('AWS metadata', init.log, now)
      const seen = new Set<string>()
      let active: string | undefined
      while (!signal.aborted) {
        try {
          const action = await get('/latest/meta-data/spot/instance-action', signal)
          if (action.status === 200) {
            const o = json(action.body, 'spot/instance-action')
            const kind = o.action === 'stop' || o.action === 'hibernate' ? o.action : 'terminate'
            const deadlineAt = parseTime(o.time, 'spot/instance-action')
            const id = `aws:${kind}:${deadlineAt}`
            if (!seen.has(id)) {
              seen.add(id)
              active = id
              onNotice({
                provider: 'aws',
                kind,
                id,
                receivedAt: now(),
                deadlineAt,
                detail: `spot instance-action ${kind} at ${new Date(deadlineAt).toISOString()}`,
              })
            }
          } else if (action.status === 404) {
            if (active !== undefined) {
              seen.delete(active)
              onClear?.(active)
              active = undefined
            }
          } else throw new MetadataError(`spot/instance-action answered ${action.status}`)
          const reb = await get('/latest/meta-data/events/recommendations/rebalance', signal)
          if (reb.status === 200) {
            const o = json(reb.body, 'rebalance')
            const at = parseTime(o.noticeTime, 'rebalance')
            const id = `aws:rebalance:${at}`
            if (!seen.has(id)) {
              seen.add(id)
              onNotice({
                provider: 'aws',
                kind: 'rebalance',
                id,
                receivedAt: now(),
                detail: `rebalance recommendation since ${new Date(at).toISOString()}`,
              })
            }
          } else if (reb.status !== 404) throw new MetadataError(`rebalance answered ${reb.status}`)
          flaky.ok()
        } catch (err) {
          if (err instanceof AbortError) return
          flaky.fail(err)
        }
        await pause(pollMs, signal)
      }
    },
  }
}

export function gcpWatcher(init: WatcherInit = {}): NoticeWatcher {
  const base = init.endpoint ?? METADATA_ENDPOINT
  const now = init.now ?? Date.now
  const timeoutMs = init.requestTimeoutMs ?? 2000
  const windowMs = init.windowMs ?? 30_000
  // Long-poll for this long per request (GCP answers with the unchanged value at timeout_sec).
  const waitS = 60
  const path = '/computeMetadata/v1/instance/preempted'
  return {
    provider: 'gcp',
    describe: `GCP metadata at ${base} (instance/preempted, wait_for_change)`,
    async run(onNotice, signal) {
      const flaky = flakyReporter('GCP metadata', init.log, now)
      let etag: string | undefined
      while (!signal.aborted) {
        try {
          const url =
            etag === undefined
              ? `${base}${path}`
              : `${base}${path}?wait_for_change=true&last_etag=${encodeURIComponent(etag)}&timeout_sec=${waitS}`
          const r = await request(
            url,
            {
              headers: { 'Metadata-Flavor': 'Google' },
              timeoutMs: etag === undefined ? timeoutMs : (waitS + 5) * 1000,
            },
            signal,
          )
          if (r.status !== 200) throw new MetadataError(`instance/preempted answered ${r.status}`)
          if (r.headers.get('metadata-flavor') !== 'Google')
            throw new MetadataError('instance/preempted: the answer lacks Metadata-Flavor: Google')
          const value = r.body.trim()
          if (value !== 'TRUE' && value !== 'FALSE')
            throw new MetadataError(`instance/preempted: expected TRUE or FALSE, got '${value.slice(0, 32)}'`)
          const next = r.headers.get('etag') ?? undefined
          flaky.ok()
          if (value === 'TRUE') {
            const receivedAt = now()
            onNotice({
              provider: 'gcp',
              kind: 'preempt',
              id: `gcp:preempted:${next ?? receivedAt}`,
              receivedAt,
              deadlineAt: receivedAt + windowMs,
              detail: `instance/preempted TRUE (${windowMs / 1000} s notice)`,
            })
            // Preemption is final: nothing more to hear.
            return
          }
          // No ETag: poll plainly instead of waiting for a change we could not name.
          etag = next
          if (etag === undefined) await pause(init.pollMs ?? 1000, signal)
        } catch (err) {
          if (err instanceof AbortError) return
          flaky.fail(err)
          etag = undefined
          await pause(init.pollMs ?? 1000, signal)
        }
      }
    },
  }
}

export const AZURE_API_VERSION = '2020-07-01'

interface AzureEvent {
  EventId: string
  EventType: string
  ResourceType?: string
  Resources: string[]
  EventStatus?: string
  NotBefore?: string
  Description?: string
}

function parseAzureEvents(body: string): { incarnation: number; events: AzureEvent[] } {
  let o: Record<string, unknown>
  try {
    o = JSON.parse(body) as Record<string, unknown>
  } catch (cause) {
    throw new MetadataError('scheduledevents: not JSON', { cause })
  }
  if (typeof o !== 'object' || o === null || !Array.isArray(o.Events) || o.Events.length > 1000)
    throw new MetadataError('scheduledevents: no Events array')
  const events: AzureEvent[] = []
  for (const e of o.Events as unknown[]) {
    const ev = e as Record<string, unknown>
    if (
      typeof ev !== 'object' ||
      ev === null ||
      typeof ev.EventId !== 'string' ||
      ev.EventId.length > 128 ||
      typeof ev.EventType !== 'string' ||
      !Array.isArray(ev.Resources)
    )
      throw new MetadataError('scheduledevents: malformed event')
    events.push({
      EventId: ev.EventId,
      EventType: ev.EventType,
      Resources: ev.Resources.filter((r): r is string => typeof r === 'string'),
      ...(typeof ev.EventStatus === 'string' ? { EventStatus: ev.EventStatus } : {}),
      ...(typeof ev.NotBefore === 'string' ? { NotBefore: ev.NotBefore } : {}),
      ...(typeof ev.Description === 'string' ? { Description: ev.Description.slice(0, 256) } : {}),
    })
  }
  return { incarnation: typeof o.DocumentIncarnation === 'number' ? o.DocumentIncarnation : 0, events }
}

export function azureWatcher(init: WatcherInit = {}): NoticeWatcher {
  const base = init.endpoint ?? METADATA_ENDPOINT
  const now = init.now ?? Date.now
  const pollMs = init.pollMs ?? 1000
  const timeoutMs = init.requestTimeoutMs ?? 2000
  const windowMs = init.windowMs ?? 30_000
  const eventsUrl = `${base}/metadata/scheduledevents?api-version=${AZURE_API_VERSION}`
  const headers = { Metadata: 'true' }
  const watcher: NoticeWatcher = {
    provider: 'azure',
    describe: `Azure Scheduled Events at ${base} (Preempt)`,
    async run(onNotice, signal, onClear) {
      const flaky = flakyReporter('Azure metadata', init.log, now)
      const seen = new Set<string>()
      let self: string | undefined
      while (!signal.aborted) {
        try {
          if (self === undefined) {
            const r = await request(
              `${base}/metadata/instance/compute/name?api-version=2021-02-01&format=text`,
              { headers, timeoutMs },
              signal,
            )
            if (r.status !== 200 || r.body.trim() === '' || r.body.length > 256)
              throw new MetadataError(`instance/compute/name answered ${r.status}`)
            self = r.body.trim()
          }
          const r = await request(eventsUrl, { headers, timeoutMs }, signal)
          if (r.status !== 200) throw new MetadataError(`scheduledevents answered ${r.status}`)
          const { events } = parseAzureEvents(r.body)
          flaky.ok()
          // An event that left the document was cancelled by the platform.
          for (const id of [...seen])
            if (!events.some((e) => e.EventId === id)) {
              seen.delete(id)
              onClear?.(id)
            }
          for (const e of events) {
            // Only a Preempt of this VM: other events (Freeze, Reboot...) or other VMs' are not ours.
            if (e.EventType !== 'Preempt' || !e.Resources.includes(self) || seen.has(e.EventId)) continue
            seen.add(e.EventId)
            const receivedAt = now()
            const nb = e.NotBefore === undefined || e.NotBefore === '' ? Number.NaN : Date.parse(e.NotBefore)
            const deadlineAt = Number.isFinite(nb) ? nb : receivedAt + windowMs
            onNotice({
              provider: 'azure',
              kind: 'preempt',
              id: e.EventId,
              receivedAt,
              deadlineAt,
              detail: `scheduled event Preempt ${e.EventId} not before ${new Date(deadlineAt).toISOString()}`,
            })
          }
        } catch (err) {
          if (err instanceof AbortError) return
          flaky.fail(err)
        }
        await pause(pollMs, signal)
      }
    },
    async acknowledge(notice, signal) {
      const r = await request(
        eventsUrl,
        {
          method: 'POST',
          headers: { ...headers, 'Content-Type': 'application/json' },
          body: JSON.stringify({ StartRequests: [{ EventId: notice.id }] }),
          timeoutMs,
        },
        signal ?? new AbortController().signal,
      )
      if (r.status !== 200) throw new MetadataError(`acknowledging ${notice.id} answered ${r.status}`)
    },
  }
  return watcher
}

export function urlWatcher(url: string, init: WatcherInit = {}): NoticeWatcher {
  const now = init.now ?? Date.now
  const pollMs = init.pollMs ?? 1000
  const timeoutMs = init.requestTimeoutMs ?? 2000
  const windowMs = init.windowMs ?? 30_000
  return {
    provider: 'url',
    describe: `GET ${url}`,
    async run(onNotice, signal, onClear) {
      const flaky = flakyReporter(url, init.log, now)
      const seen = new Set<string>()
      while (!signal.aborted) {
        try {
          const r = await request(url, { timeoutMs }, signal)
          if (r.status === 200) {
            const n = parseGenericNotice('url', r.body, now(), windowMs)
            if (!seen.has(n.id)) {
              seen.add(n.id)
              onNotice(n)
            }
          } else if (r.status === 404 || r.status === 204) {
            for (const id of seen) onClear?.(id)
            seen.clear()
          } else throw new MetadataError(`answered ${r.status}`)
          flaky.ok()
        } catch (err) {
          if (err instanceof AbortError) return
          flaky.fail(err)
        }
        await pause(pollMs, signal)
      }
    },
  }
}

export function fileWatcher(path: string, init: WatcherInit = {}): NoticeWatcher {
  const now = init.now ?? Date.now
  const pollMs = init.pollMs ?? 1000
  const windowMs = init.windowMs ?? 30_000
  return {
    provider: 'file',
    describe: `file ${path}`,
    async run(onNotice, signal, onClear) {
      const flaky = flakyReporter(path, init.log, now)
      const seen = new Set<string>()
      while (!signal.aborted) {
        try {
          const body = await readFile(path, 'utf8').catch((err: NodeJS.ErrnoException) => {
            if (err.code === 'ENOENT') return undefined
            throw new MetadataError(`cannot read ${path}: ${err.message}`, { cause: err })
          })
          if (body === undefined) {
            for (const id of seen) onClear?.(id)
            seen.clear()
          } else {
            // Receipt time: the file's content may name a deadline; an empty file means "now + window".
            const n = parseGenericNotice('file', body.slice(0, 64 * 1024), now(), windowMs)
            if (!seen.has(n.id)) {
              seen.add(n.id)
              onNotice(n)
            }
          }
          flaky.ok()
        } catch (err) {
          flaky.fail(err)
        }
        await pause(pollMs, signal)
      }
    },
  }
}

export function createWatcher(source: SpotSource, init: WatcherInit = {}): NoticeWatcher {
  switch (source.provider) {
    case 'aws':
      return awsWatcher({ ...init, ...(source.endpoint === undefined ? {} : { endpoint: source.endpoint }) })
    case 'gcp':
      return gcpWatcher({ ...init, ...(source.endpoint === undefined ? {} : { endpoint: source.endpoint }) })
    case 'azure':
      return azureWatcher({
        ...init,
        ...(source.endpoint === undefined ? {} : { endpoint: source.endpoint }),
      })
    case 'url':
      return urlWatcher(source.url, init)
    case 'file':
      return fileWatcher(source.path, init)
  }
}

export type { Notice }
