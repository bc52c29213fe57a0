/**
 * Fake cloud metadata servers that speak each provider's documented spot-notice protocol strictly, for
 * the notice watchers' tests and the spot system tests (there served on 169.254.169.254:80 inside a
 * host's namespace, like the real ones):
 *
 * - aws: IMDSv2 only. `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` (1–21600);
 *   every GET needs a live `X-aws-ec2-metadata-token` (else 401). `spot/instance-action` and
 *   `events/recommendations/rebalance` are 404 until notice()/rebalance().
 * - gcp: every request needs `Metadata-Flavor: Google` (else 403); `instance/preempted` is FALSE/TRUE
 *   with an ETag; `?wait_for_change=true[&last_etag=E][&timeout_sec=N]` is held until the value changes.
 * - azure: every request needs `Metadata: true` and an `api-version` (else 400); scheduledevents lists
 *   events with a DocumentIncarnation; a POST of `{"StartRequests":[{"EventId":…}]}` acknowledges one
 *   (recorded; an unknown EventId is 400); `instance/compute/name` answers the VM's name.
 * All refuse `X-Forwarded-For` (the providers do: the metadata service is not for proxies).
 *
 * As a program (inside a namespace): `tsx test/helpers/fake-metadata.ts PROVIDER HOST PORT [VMNAME]`;
 * stdin takes `notice [SECONDS]`, `rebalance`, `event TYPE RESOURCE`, `quit`; stdout has one JSON object
 * per line: `{"event":"listening","url":…}`, `{"event":"request",…}`, `{"event":"ack","id":…}`.
 */
import { randomBytes } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

export type FakeProvider = 'aws' | 'gcp' | 'azure'

export interface FakeRequest {
  method: string
  path: string
  status: number
  at: number
}

export interface FakeMetadata {
  readonly provider: FakeProvider
  readonly url: string
  /** A termination notice that ends `seconds` from now (aws default 120, gcp/azure 30). */
  notice(seconds?: number): void
  /** aws: a rebalance recommendation. */
  rebalance(): void
  /** azure: any scheduled event (e.g. a Freeze, or a Preempt of another VM). Returns its EventId. */
  event(type: string, resources: string[], seconds?: number): string
  readonly requests: FakeRequest[]
  /** azure: EventIds acknowledged with StartRequests, in order. */
  readonly acks: string[]
  /** Calls for every request answered (the program form prints them). */
  onRequest?: (r: FakeRequest) => void
  onAck?: (id: string) => void
  close(): Promise<void>
}

const json = (res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) => {
  res.writeHead(status, { 'Content-Type': 'application/json', ...headers })
  res.end(JSON.stringify(body))
}
const text = (res: ServerResponse, status: number, body: string, headers: Record<string, string> = {}) => {
  res.writeHead(status, { 'Content-Type': 'text/plain', ...headers })
  res.end(body)
}

async function readRequestBody(req: IncomingMessage, max = 64 * 1024): Promise<string> {
  const chunks: Buffer[] = []
  let n = 0
  for await (const c of req) {
    n += (c as Buffer).byteLength
    if (n > max) throw new Error('body too large')
    chunks.push(c as Buffer)
  }
  return Buffer.concat(chunks).toString('utf8')
}

export async function startFakeMetadata(
  provider: FakeProvider,
  opts: { host?: string; port?: number; vmName?: string } = {},
): Promise<FakeMetadata> {
  const vmName = opts.vmName ?? 'spot-host'
  const requests: FakeRequest[] = []
  const acks: string[] = []
  // aws
  const tokens = new Map<string, number>()
  let instanceAction: { action: string; time: string } | undefined
  let rebalanceAt: string | undefined
  // gcp
  let preempted = false
  const waiters = new Set<() => void>()
  const etag = () => (preempted ? 'e-true' : 'e-false')
  // azure
  let incarnation = 1
  const events: Record<string, unknown>[] = []

  let fake: FakeMetadata
  const record = (req: IncomingMessage, status: number) => {
    const r = { method: req.method ?? '?', path: req.url ?? '?', status, at: Date.now() }
    requests.push(r)
    fake.onRequest?.(r)
  }

  const aws = async (req: IncomingMessage, res: ServerResponse, url: URL): Promise<number> => {
    if (req.method === 'PUT' && url.pathname === '/latest/api/token') {
      const ttl = Number(req.headers['x-aws-ec2-metadata-token-ttl-seconds'])
      if (!Number.isInteger(ttl) || ttl < 1 || ttl > 21_600) {
        text(res, 400, 'Bad Request: X-aws-ec2-metadata-token-ttl-seconds required (1-21600)')
        return 400
      }
      const token = randomBytes(42).toString('base64url')
      tokens.set(token, Date.now() + ttl * 1000)
      text(res, 200, token, { 'X-aws-ec2-metadata-token-ttl-seconds': String(ttl) })
      return 200
    }
    if (req.method !== 'GET') {
      text(res, 405, 'Method Not Allowed')
      return 405
    }
    const token = req.headers['x-aws-ec2-metadata-token']
    const until = typeof token === 'string' ? tokens.get(token) : undefined
    if (until === undefined || until < Date.now()) {
      // IMDSv2 required: no (live) token, no answer.
      text(res, 401, 'Unauthorized')
      return 401
    }
    if (url.pathname === '/latest/meta-data/spot/instance-action' && instanceAction !== undefined) {
      json(res, 200, instanceAction)
      return 200
    }
    if (url.pathname === '/latest/meta-data/events/recommendations/rebalance' && rebalanceAt !== undefined) {
      json(res, 200, { noticeTime: rebalanceAt })
      return 200
    }
    text(res, 404, 'Not Found')
    return 404
  }

  const gcp = async (req: IncomingMessage, res: ServerResponse, url: URL): Promise<number> => {
    if (req.headers['metadata-flavor'] !== 'Google') {
      text(
        res,
        403,
        'Your client does not have permission to get URL from this server. Missing Metadata-Flavor:Google header.',
      )
      return 403
    }
    if (req.method !== 'GET') {
      text(res, 405, 'Method Not Allowed')
      return 405
    }
    if (url.pathname !== '/computeMetadata/v1/instance/preempted') {
      text(res, 404, 'Not Found')
      return 404
    }
    const answer = () =>
      text(res, 200, preempted ? 'TRUE' : 'FALSE', { 'Metadata-Flavor': 'Google', ETag: etag() })
    if (url.searchParams.get('wait_for_change') === 'true') {
      const last = url.searchParams.get('last_etag')
      if (last === null || last === etag()) {
        const timeoutS = Math.min(Number(url.searchParams.get('timeout_sec') ?? 3600) || 3600, 3600)
        await new Promise<void>((resolve) => {
          const done = () => {
            clearTimeout(timer)
            waiters.delete(done)
            resolve()
          }
          const timer = setTimeout(done, timeoutS * 1000)
          waiters.add(done)
          req.socket.once('close', done)
        })
        if (res.destroyed) return 499
      }
    }
    answer()
    return 200
  }

  const azure = async (req: IncomingMessage, res: ServerResponse, url: URL): Promise<number> => {
    if (req.headers.metadata !== 'true') {
      json(res, 400, { error: 'Bad request. Required metadata header not specified' })
      return 400
    }
    const version = url.searchParams.get('api-version')
    if (version === null || !/^\d{4}-\d{2}-\d{2}$/.test(version)) {
      json(res, 400, { error: 'Bad request. api-version was not specified or is invalid' })
      return 400
    }
    if (url.pathname === '/metadata/instance/compute/name' && req.method === 'GET') {
      text(res, 200, vmName)
      return 200
    }
    if (url.pathname !== '/metadata/scheduledevents') {
      json(res, 404, { error: 'Not found' })
      return 404
    }
    if (req.method === 'GET') {
      json(res, 200, { DocumentIncarnation: incarnation, Events: events })
      return 200
    }
    if (req.method === 'POST') {
      let ids: string[]
      try {
        const o = JSON.parse(await readRequestBody(req)) as { StartRequests?: { EventId?: unknown }[] }
        if (!Array.isArray(o.StartRequests) || o.StartRequests.length === 0)
          throw new Error('no StartRequests')
        ids = o.StartRequests.map((s) => {
          if (typeof s?.EventId !== 'string') throw new Error('no EventId')
          return s.EventId
        })
        for (const id of ids) if (!events.some((e) => e.EventId === id)) throw new Error(`unknown ${id}`)
      } catch (err) {
        json(res, 400, { error: `Bad request. ${(err as Error).message}` })
        return 400
      }
      for (const id of ids) {
        const e = events.find((x) => x.EventId === id)!
        e.EventStatus = 'Started'
        acks.push(id)
        fake.onAck?.(id)
      }
      incarnation++
      res.writeHead(200)
      res.end()
      return 200
    }
    json(res, 405, { error: 'Method not allowed' })
    return 405
  }

  const server: Server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://metadata')
    const handle = async (): Promise<number> => {
      if (req.headers['x-forwarded-for'] !== undefined) {
        // All three refuse proxied requests (AWS: 403 on PUT; GCP: 403; Azure: 400).
        text(res, provider === 'azure' ? 400 : 403, 'Forbidden: X-Forwarded-For')
        return provider === 'azure' ? 400 : 403
      }
      if (provider === 'aws') return aws(req, res, url)
      if (provider === 'gcp') return gcp(req, res, url)
      return azure(req, res, url)
    }
    handle().then(
      (status) => record(req, status),
      (err: unknown) => {
        if (!res.headersSent) text(res, 500, String(err))
        record(req, 500)
      },
    )
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', () => resolve())
  })
  const addr = server.address() as AddressInfo
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address
  const eventSeq = { n: 0 }

  fake = {
    provider,
    url: addr.port === 80 ? `http://${host}` : `http://${host}:${addr.port}`,
    requests,
    acks,
    notice(seconds) {
      if (provider === 'aws') {
        instanceAction = {
          action: 'terminate',
          time: new Date(Date.now() + (seconds ?? 120) * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z'),
        }
      } else if (provider === 'gcp') {
        preempted = true
        for (const w of [...waiters]) w()
      } else fake.event('Preempt', [vmName], seconds ?? 30)
    },
    rebalance() {
      rebalanceAt = new Date().toISOString().replace(/\.\d{3}Z$/, 'Z')
    },
    event(type, resources, seconds = 30) {
      const id = `${randomBytes(4).toString('hex').toUpperCase()}-${++eventSeq.n}`
      events.push({
        EventId: id,
        EventType: type,
        ResourceType: 'VirtualMachine',
        Resources: resources,
        EventStatus: 'Scheduled',
        NotBefore: new Date(Date.now() + seconds * 1000).toUTCString(),
        Description: `${type} scheduled by the fake metadata server`,
        EventSource: 'Platform',
        DurationInSeconds: -1,
      })
      incarnation++
      return id
    },
    async close() {
      for (const w of [...waiters]) w()
      server.closeAllConnections()
      await new Promise<void>((r) => server.close(() => r()))
    },
  }
  return fake
}

async function programMain(argv: string[]): Promise<void> {
  const [provider, host, port, vmName] = argv
  if (provider !== 'aws' && provider !== 'gcp' && provider !== 'azure') {
    process.stderr.write('usage: fake-metadata.ts aws|gcp|azure HOST PORT [VMNAME]\n')
    process.exit(2)
  }
  const out = (o: unknown) => process.stdout.write(`${JSON.stringify(o)}\n`)
  const fake = await startFakeMetadata(provider, {
    ...(host === undefined ? {} : { host }),
    ...(port === undefined ? {} : { port: Number(port) }),
    ...(vmName === undefined ? {} : { vmName }),
  })
  fake.onRequest = (r) => out({ event: 'request', ...r })
  fake.onAck = (id) => out({ event: 'ack', id })
  out({ event: 'listening', url: fake.url })
  const rl = createInterface({ input: process.stdin })
  rl.on('line', (line) => {
    const [cmd, a, b] = line.trim().split(/\s+/)
    if (cmd === 'notice') {
      fake.notice(a === undefined ? undefined : Number(a))
      out({ event: 'notice', at: Date.now() })
    } else if (cmd === 'rebalance') fake.rebalance()
    else if (cmd === 'event' && a !== undefined && b !== undefined)
      out({ event: 'event', id: fake.event(a, [b]) })
    else if (cmd === 'quit') void fake.close().then(() => process.exit(0))
  })
  rl.on('close', () => void fake.close().then(() => process.exit(0)))
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === resolve(process.argv[1])) {
  void programMain(process.argv.slice(2))
}
