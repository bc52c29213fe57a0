import assert from 'node:assert/strict'
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createWebView } from '../../src/agent/web.ts'
import { createLogger } from '../../src/base/log.ts'

const quiet = createLogger({ sink: () => {} })

function get(addr: string, path: string, headers: Record<string, string> = {}) {
  const [host, port] = [addr.slice(0, addr.lastIndexOf(':')), Number(addr.slice(addr.lastIndexOf(':') + 1))]
  return new Promise<{ status: number; headers: Record<string, unknown>; body: string }>(
    (resolve, reject) => {
      const req = request({ host, port, path, headers: { host: addr, ...headers } }, (res) => {
        let body = ''
        res.on('data', (d: Buffer) => {
          body += d.toString()
          if (res.headers['content-type'] === 'text/event-stream' && body.includes('event: state'))
            res.destroy()
        })
        res.on('close', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }))
      })
      req.on('error', reject)
      req.end()
    },
  )
}

describe('web view (token, Host check, state and events)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mesh-web-unit-'))
  after(() => rmSync(dir, { recursive: true, force: true }))

  it('logs in with the token only, serves the page, the state and live events', async () => {
    const w = createWebView({
      listen: '127.0.0.1:0',
      stateDir: dir,
      log: quiet,
      sources: {
        self: () => ({ peerId: 'me', name: 'a1' }),
        members: () => [],
        tunnel: () => undefined,
        vms: async () => [{ peer: 'me', member: 'a1', self: true, vms: [{ name: 'g1', status: 'running' }] }],
      },
    })
    await w.start(new AbortController().signal)
    try {
      const addr = w.address()!
      const token = readFileSync(join(dir, 'web.token'), 'utf8').trim()
      assert.equal(statSync(join(dir, 'web.token')).mode & 0o777, 0o600)
      assert.equal((await get(addr, '/')).status, 401)
      assert.equal((await get(addr, '/api/state')).status, 401)
      assert.equal((await get(addr, '/login?token=nope')).status, 403)
      // A page on another origin that resolves to 127.0.0.1 (DNS rebinding) is refused.
      assert.equal(
        (await get(addr, '/', { host: 'evil.example:80', cookie: `mesh_web=${token}` })).status,
        421,
      )
      const login = await get(addr, `/login?token=${token}`)
      assert.equal(login.status, 303)
      const cookie = String((login.headers['set-cookie'] as string[])[0]).split(';')[0]!
      assert.match(String(login.headers['set-cookie']), /HttpOnly; SameSite=Strict/)
      const page = await get(addr, '/', { cookie })
      assert.equal(page.status, 200)
      assert.match(page.body, /<svg id="graph"/)
      const st = JSON.parse((await get(addr, '/api/state', { authorization: `Bearer ${token}` })).body)
      assert.equal(st.members[0].vms[0].name, 'g1')
      w.observeState({ vm: 'g1', direction: 'out', peer: 'pb', from: 'setup', to: 'bulk', atMs: Date.now() })
      const ev = await get(addr, '/api/events', { cookie })
      assert.match(ev.body, /event: state/)
      assert.match(ev.body, /"migrations":\[\{[^\]]*"vm":"g1"/)
    } finally {
      await w.stop()
    }
  })
})
