/**
 * A real Prometheus server (Debian's `prometheus` package) for tests: scrapes the given targets every
 * second, stores in a temp dir, answers its HTTP API on a free loopback port; stop() kills it and removes
 * the dir. `spawnIn` runs it in a namespace (a cloud host) when the targets live there.
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const PROMETHEUS = '/usr/bin/prometheus'

export async function freePort(host = '127.0.0.1'): Promise<number> {
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, host, () => r()))
  const port = (srv.address() as { port: number }).port
  await new Promise<void>((r) => srv.close(() => r()))
  return port
}

export interface PrometheusServer {
  url: string
  /** One instant query through the HTTP API: the result vector. */
  query(q: string): Promise<Array<{ metric: Record<string, string>; value: [number, string] }>>
  /** Polls query(q) until pred(result) holds. */
  waitFor(
    q: string,
    pred: (r: Array<{ metric: Record<string, string>; value: [number, string] }>) => boolean,
    timeoutMs: number,
  ): Promise<Array<{ metric: Record<string, string>; value: [number, string] }>>
  log(): string
  stop(): Promise<void>
}

export async function startPrometheus(opts: {
  targets: string[]
  port: number
  spawnIn?: (cmd: string, args: string[]) => ChildProcess
  /** GETs a URL where Prometheus runs (a namespace's loopback is not ours): default fetch(). */
  get?: (url: string) => Promise<string>
}): Promise<PrometheusServer> {
  const dir = mkdtempSync(join(tmpdir(), 'mesh-prom-'))
  const config = join(dir, 'prometheus.yml')
  writeFileSync(
    config,
    [
      'global:',
      '  scrape_interval: 1s',
      '  evaluation_interval: 1s',
      'scrape_configs:',
      '  - job_name: mesh',
      '    static_configs:',
      `      - targets: [${opts.targets.map((t) => `'${t}'`).join(', ')}]`,
      '',
    ].join('\n'),
  )
  const args = [
    `--config.file=${config}`,
    `--storage.tsdb.path=${join(dir, 'data')}`,
    `--web.listen-address=127.0.0.1:${opts.port}`,
    '--log.level=warn',
  ]
  const child = (opts.spawnIn ?? ((c, a) => spawn(c, a, { stdio: ['ignore', 'ignore', 'pipe'] })))(
    PROMETHEUS,
    args,
  )
  let log = ''
  child.stderr?.on('data', (b: Buffer) => {
    log = (log + b.toString()).slice(-8000)
  })
  const url = `http://127.0.0.1:${opts.port}`
  const exited = new Promise<void>((r) => child.once('exit', () => r()))
  const query: PrometheusServer['query'] = async (q) => {
    const target = `${url}/api/v1/query?query=${encodeURIComponent(q)}`
    const text = opts.get === undefined ? await (await fetch(target)).text() : await opts.get(target)
    const body = JSON.parse(text) as { status: string; data?: { result: [] }; error?: string }
    if (body.status !== 'success') throw new Error(`prometheus query ${q}: ${body.error}`)
    return body.data?.result ?? []
  }
  const server: PrometheusServer = {
    url,
    query,
    async waitFor(q, pred, timeoutMs) {
      const until = Date.now() + timeoutMs
      let last: unknown
      for (;;) {
        if (child.exitCode !== null) throw new Error(`prometheus exited ${child.exitCode}: ${log}`)
        try {
          const r = await query(q)
          if (pred(r)) return r
          last = r
        } catch (err) {
          last = String(err) // not up yet
        }
        if (Date.now() > until)
          throw new Error(`prometheus: '${q}' never matched; last: ${JSON.stringify(last)}; log: ${log}`)
        await new Promise((r) => setTimeout(r, 250))
      }
    },
    log: () => log,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM')
        const t = setTimeout(() => child.kill('SIGKILL'), 5000)
        await exited
        clearTimeout(t)
      }
      rmSync(dir, { recursive: true, force: true })
    },
  }
  return server
}
