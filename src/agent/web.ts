/**
 * The agent's live web view (`mesh agent --web [ADDR:PORT]`, default 127.0.0.1:9465): members and links
 * as a picture, VMs and where they run, each migration as a timeline, updated live over server-sent
 * events. Read-only.
 *
 * Access: a random token (STATE/web.token, mode 0600; `mesh web` prints the login URL). GET
 * /login?token=T sets an HttpOnly SameSite=Strict cookie; every other path needs that cookie or
 * `Authorization: Bearer T`. The Host header must name the address served (no DNS rebinding), and it
 * binds to loopback unless told otherwise.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { join } from 'node:path'
import type { MemberStatus } from '../../net/interfaces.ts'
import type { SwitchStatus } from '../../net/tunnel/interfaces.ts'
import type { MigrationProgress, MigrationReport } from '../../vm/migration/interfaces.ts'
import { MeshError } from '../base/errors.ts'
import type { Logger } from '../base/log.ts'
import { isLoopback, parseListenAddr } from '../config.ts'
import type { AgentService } from './interfaces.ts'
import type { MigrationStateObservation } from './metrics.ts'
import { pathLabel } from './path-label.ts'
import { WEB_PAGE } from './web-page.ts'

export class WebViewError extends MeshError {}

export const WEB_TOKEN_FILE = 'web.token'

export interface WebSources {
  self(): { peerId: string; name: string }
  members(): MemberStatus[]
  tunnel(): SwitchStatus | undefined
  /** Every member's VMs (this host's included), asked live. */
  vms(): Promise<Array<{ peer: string; member: string; self: boolean; vms: unknown[]; error?: string }>>
}

/** One migration as the page draws it: states with their start times, progress, the report. */
export interface MigrationTimeline {
  id: string
  vm: string
  direction: 'out' | 'in'
  peer: string
  startedAt: number
  state: string
  phases: Array<{ state: string; at: number }>
  progress?: Pick<
    MigrationProgress,
    'phase' | 'round' | 'wireBytes' | 'ramBytes' | 'dedupBytes' | 'rateBytesPerSec' | 'dirtyRateBytesPerSec'
  >
  report?: Pick<
    MigrationReport,
    'totalMs' | 'downtimeMs' | 'wireBytes' | 'rounds' | 'ramBytes' | 'switchReason' | 'from' | 'to'
  >
  endedAt?: number
}

export interface WebView extends AgentService {
  observeState(e: MigrationStateObservation): void
  observeProgress(p: MigrationProgress): void
  observeReport(r: MigrationReport): void
  address(): string | undefined
}

const TERMINAL = new Set(['completed', 'rolled-back', 'in-doubt', 'running', 'discarded', 'failed'])
const KEEP_MIGRATIONS = 20

export function createWebView(init: {
  listen: string
  stateDir: string
  sources: WebSources
  log: Logger
  /** Tests: a fixed token. */
  token?: string
}): WebView {
  const { host, port } = parseListenAddr(init.listen, '--web')
  const { sources, log } = init
  const token = init.token ?? randomBytes(32).toString('hex')
  const tokenBuf = Buffer.from(token)
  const timelines: MigrationTimeline[] = []
  const live = new Map<string, MigrationTimeline>() // `${direction}/${vm}`
  const clients = new Set<ServerResponse>()
  let server: Server | undefined
  let bound: string | undefined
  let ticker: NodeJS.Timeout | undefined
  let seq = 0

  const push = (event: string, data: unknown) => {
    const msg = `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`
    for (const c of clients) c.write(msg)
  }
  const timelineFor = (direction: 'out' | 'in', vm: string, peer: string, at: number) => {
    const key = `${direction}/${vm}`
    let t = live.get(key)
    if (t === undefined) {
      t = { id: `${at}-${++seq}`, vm, direction, peer, startedAt: at, state: 'setup', phases: [] }
      live.set(key, t)
      timelines.unshift(t)
      timelines.splice(KEEP_MIGRATIONS)
    }
    return t
  }

  const links = () => {
    const ports = new Map((sources.tunnel()?.ports ?? []).map((p) => [p.detail ?? p.id, p]))
    return sources
      .members()
      .filter((m) => !m.self)
      .map((m) => {
        const p = ports.get(m.peerId)
        return {
          peer: m.peerId,
          name: m.name,
          state: m.state,
          link: m.link,
          path: pathLabel(m),
          ...(m.rttMs === undefined ? {} : { rttMs: m.rttMs }),
          // Cumulative tunnel bytes to/from the member: the page turns them into a rate.
          ...(p === undefined ? {} : { txBytes: p.txBytes, rxBytes: p.rxBytes }),
        }
      })
  }
  const snapshot = async () => ({
    at: Date.now(),
    self: sources.self(),
    links: links(),
    members: await sources.vms().catch(() => []),
    migrations: timelines,
  })

  const authorized = (req: IncomingMessage): boolean => {
    const given: string[] = []
    const auth = req.headers.authorization
    if (auth?.startsWith('Bearer ')) given.push(auth.slice(7))
    for (const c of (req.headers.cookie ?? '').split(';')) {
      const [k, v] = c.trim().split('=')
      if (k === 'mesh_web' && v !== undefined) given.push(v)
    }
    return given.some((g) => {
      const b = Buffer.from(g)
      return b.length === tokenBuf.length && timingSafeEqual(b, tokenBuf)
    })
  }
  const hostOk = (req: IncomingMessage): boolean => {
    const h = req.headers.host ?? ''
    return bound !== undefined && (h === bound || h === `localhost:${bound.split(':').pop()}`)
  }
  const send = (
    res: ServerResponse,
    status: number,
    type: string,
    body: string,
    extra: Record<string, string> = {},
  ) =>
    res
      .writeHead(status, {
        'content-type': type,
        'cache-control': 'no-store',
        'x-content-type-options': 'nosniff',
        'x-frame-options': 'DENY',
        'content-security-policy':
          "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        ...extra,
      })
      .end(body)

  const handle = (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://x')
    if (!hostOk(req)) return send(res, 421, 'text/plain', 'wrong Host\n')
    if (req.method !== 'GET') return send(res, 405, 'text/plain', 'read-only\n')
    if (url.pathname === '/login') {
      const t = Buffer.from(url.searchParams.get('token') ?? '')
      if (t.length !== tokenBuf.length || !timingSafeEqual(t, tokenBuf))
        return send(res, 403, 'text/plain', "bad token (see 'mesh web')\n")
      return send(res, 303, 'text/plain', 'ok\n', {
        location: '/',
        'set-cookie': `mesh_web=${token}; HttpOnly; SameSite=Strict; Path=/`,
      })
    }
    if (!authorized(req)) return send(res, 401, 'text/plain', "log in with the URL 'mesh web' prints\n")
    if (url.pathname === '/') return send(res, 200, 'text/html; charset=utf-8', WEB_PAGE)
    if (url.pathname === '/api/state') {
      snapshot().then(
        (s) => send(res, 200, 'application/json', JSON.stringify(s)),
        (err: unknown) => send(res, 500, 'text/plain', `${String(err)}\n`),
      )
      return
    }
    if (url.pathname === '/api/events') {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store' })
      res.write('retry: 1000\n\n')
      clients.add(res)
      req.on('close', () => clients.delete(res))
      snapshot().then(
        (s) => res.write(`event: state\ndata: ${JSON.stringify(s)}\n\n`),
        () => {},
      )
      return
    }
    send(res, 404, 'text/plain', 'not found\n')
  }

  return {
    name: 'web',
    address: () => bound,
    observeState(e) {
      const t = timelineFor(e.direction, e.vm, e.peer, e.atMs)
      t.state = e.to
      t.phases.push({ state: e.to, at: e.atMs })
      if (TERMINAL.has(e.to)) {
        t.endedAt = e.atMs
        live.delete(`${e.direction}/${e.vm}`)
      }
      push('migration', t)
    },
    observeProgress(p) {
      const t = live.get(`out/${p.vm}`)
      if (t === undefined) return
      t.progress = {
        phase: p.phase,
        round: p.round,
        wireBytes: p.wireBytes,
        ramBytes: p.ramBytes,
        dedupBytes: p.dedupBytes,
        rateBytesPerSec: p.rateBytesPerSec,
        dirtyRateBytesPerSec: p.dirtyRateBytesPerSec,
      }
      push('migration', t)
    },
    observeReport(r) {
      const t = timelines.find((x) => x.direction === 'out' && x.vm === r.vm)
      if (t === undefined) return
      t.report = {
        totalMs: r.totalMs,
        downtimeMs: r.downtimeMs,
        wireBytes: r.wireBytes,
        rounds: r.rounds,
        ramBytes: r.ramBytes,
        switchReason: r.switchReason,
        from: r.from,
        to: r.to,
      }
      push('migration', t)
    },
    async start() {
      if (!isLoopback(host))
        log.warn('the web view is served on a non-loopback address, as asked', { listen: init.listen })
      // Owner-only, written before the server accepts anything.
      writeFileSync(join(init.stateDir, WEB_TOKEN_FILE), `${token}\n`, { mode: 0o600 })
      const srv = createServer(handle)
      await new Promise<void>((resolve, reject) => {
        srv.once('error', (err) =>
          reject(
            new WebViewError(`cannot serve the web view on ${init.listen}: ${err.message}`, { cause: err }),
          ),
        )
        srv.listen(port, host, () => resolve())
      })
      const a = srv.address()
      bound =
        typeof a === 'object' && a !== null
          ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`
          : init.listen
      server = srv
      // Members, links and VMs change without events of their own here: one snapshot a second.
      ticker = setInterval(() => {
        if (clients.size === 0) return
        snapshot().then(
          (s) => push('state', s),
          () => {},
        )
      }, 1000)
      ticker.unref()
      log.info('web view up', { url: `http://${bound}/`, login: "run 'mesh web' for the login URL" })
    },
    async stop() {
      if (ticker !== undefined) clearInterval(ticker)
      for (const c of clients) c.end()
      clients.clear()
      const srv = server
      server = undefined
      if (srv === undefined) return
      srv.closeAllConnections()
      await new Promise<void>((r) => srv.close(() => r()))
    },
    handlers: () => ({}),
    status: () => ({ listen: bound }),
  }
}
