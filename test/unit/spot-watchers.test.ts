import assert from 'node:assert/strict'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  MetadataError,
  type Notice,
  type NoticeWatcher,
  parseGenericNotice,
  parseSpotSource,
} from '../../src/agent/spot/notice.ts'
import {
  awsWatcher,
  azureWatcher,
  fileWatcher,
  gcpWatcher,
  urlWatcher,
} from '../../src/agent/spot/watchers.ts'
import { createLogger } from '../../src/base/log.ts'
import { type FakeMetadata, startFakeMetadata } from '../helpers/fake-metadata.ts'
import { waitUntil } from '../helpers/wait.ts'

/** Runs a watcher until `until` says stop (or the timeout), collecting its notices. */
function watch(w: NoticeWatcher) {
  const ac = new AbortController()
  const notices: Notice[] = []
  const waiters: (() => void)[] = []
  const done = w.run((n) => {
    notices.push(n)
    for (const f of waiters.splice(0)) f()
  }, ac.signal)
  return {
    notices,
    next(timeoutMs = 5000): Promise<Notice> {
      const have = notices.length
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no notice within ${timeoutMs} ms`)), timeoutMs)
        const check = () => {
          if (notices.length > have) {
            clearTimeout(timer)
            resolve(notices[have]!)
          } else waiters.push(check)
        }
        check()
      })
    },
    async stop() {
      ac.abort()
      await done
    },
  }
}

/** Resolves once the fake has answered `n` requests matching `pred`. */
async function requestsSeen(fake: FakeMetadata, pred: (path: string) => boolean, n: number): Promise<void> {
  const t0 = Date.now()
  while (fake.requests.filter((r) => pred(r.path)).length < n) {
    if (Date.now() - t0 > 20_000)
      throw new Error(`fewer than ${n} requests seen: ${JSON.stringify(fake.requests)}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

describe('spot notice watchers against strict fake metadata servers', () => {
  let fake: FakeMetadata | undefined
  afterEach(async () => {
    await fake?.close()
    fake = undefined
  })

  it('AWS: the fake refuses a request without an IMDSv2 token; the watcher gets a token, sees the notice and the rebalance hint', async () => {
    fake = await startFakeMetadata('aws')
    const plain = await fetch(`${fake.url}/latest/meta-data/spot/instance-action`)
    assert.equal(plain.status, 401, 'IMDSv2: no token, no answer')
    const noTtl = await fetch(`${fake.url}/latest/api/token`, { method: 'PUT' })
    assert.equal(noTtl.status, 400, 'a token request needs its TTL header')
    const mine = fake.requests.length

    const w = watch(awsWatcher({ endpoint: fake.url, pollMs: 20 }))
    try {
      await requestsSeen(fake, (p) => p.endsWith('/spot/instance-action'), 3)
      assert.equal(w.notices.length, 0, 'no notice while instance-action is 404')
      const tokenPuts = fake.requests.filter((r) => r.method === 'PUT' && r.status === 200)
      assert.equal(tokenPuts.length, 1, 'one token, reused while it lives')
      assert.ok(
        fake.requests.slice(mine).every((r) => r.status === 200 || r.status === 404),
        'every GET carried the token',
      )
      const before = Date.now()
      fake.notice(120)
      const n = await w.next()
      assert.equal(n.provider, 'aws')
      assert.equal(n.kind, 'terminate')
      assert.ok(
        n.deadlineAt !== undefined && Math.abs(n.deadlineAt - (before + 120_000)) < 2000,
        'time from the answer',
      )
      fake.rebalance()
      const r = await w.next()
      assert.equal(r.kind, 'rebalance')
      assert.equal(r.deadlineAt, undefined)
      await requestsSeen(fake, (p) => p.endsWith('/spot/instance-action'), 8)
      assert.equal(w.notices.length, 2, 'a notice seen again is not a new one')
    } finally {
      await w.stop()
    }
  })

  it('GCP: the fake refuses a request without Metadata-Flavor; the watcher long-polls and hears the preemption at once', async () => {
    fake = await startFakeMetadata('gcp')
    const plain = await fetch(`${fake.url}/computeMetadata/v1/instance/preempted`)
    assert.equal(plain.status, 403)
    const mine = fake.requests.length
    // A poll interval far longer than the test: only wait_for_change can deliver the notice in time.
    const w = watch(gcpWatcher({ endpoint: fake.url, pollMs: 60_000 }))
    try {
      // The first, plain read has been answered (FALSE, with its ETag): the watcher now long-polls for a
      // change of it. (A 200 ms sleep here let a slow first read see TRUE, so no long poll was made.)
      await waitUntil('the first read answered', () =>
        fake!.requests.slice(mine).some((r) => r.path.endsWith('/instance/preempted') && r.status === 200),
      )
      assert.equal(w.notices.length, 0)
      const t0 = Date.now()
      fake.notice()
      const n = await w.next(30_000)
      // Polling would hear it after 60 s; the long poll at once (~ms). 10 s tells the two apart on a
      // loaded CI box too (a 1 s bound was a bet on the box's speed).
      assert.ok(Date.now() - t0 < 10_000, `heard within ${Date.now() - t0} ms`)
      assert.equal(n.kind, 'preempt')
      assert.ok(
        n.deadlineAt !== undefined && Math.abs(n.deadlineAt - (n.receivedAt + 30_000)) < 5,
        '30 s notice',
      )
      assert.ok(
        fake.requests.some((r) => r.path.includes('wait_for_change=true') && r.path.includes('last_etag=')),
        'waited for a change of the value it had seen',
      )
      assert.ok(
        fake.requests.slice(mine).every((r) => r.status === 200),
        'every request carried the header',
      )
    } finally {
      await w.stop()
    }
  })

  it("Azure: the fake refuses a request without Metadata: true; only this VM's Preempt is a notice, and acknowledge() sends StartRequests", async () => {
    fake = await startFakeMetadata('azure', { vmName: 'vm-a' })
    const plain = await fetch(`${fake.url}/metadata/scheduledevents?api-version=2020-07-01`)
    assert.equal(plain.status, 400)
    const noVersion = await fetch(`${fake.url}/metadata/scheduledevents`, { headers: { Metadata: 'true' } })
    assert.equal(noVersion.status, 400)
    const watcher = azureWatcher({ endpoint: fake.url, pollMs: 20 })
    const w = watch(watcher)
    try {
      fake.event('Preempt', ['vm-b'])
      fake.event('Freeze', ['vm-a'])
      await requestsSeen(fake, (p) => p.startsWith('/metadata/scheduledevents'), 3)
      assert.equal(w.notices.length, 0, "another VM's Preempt and a Freeze are not our notice")
      const before = Date.now()
      const id = fake.event('Preempt', ['vm-a'], 30)
      const n = await w.next()
      assert.equal(n.id, id)
      assert.equal(n.kind, 'preempt')
      // NotBefore has one-second precision (RFC 1123); compared with when the event was posted, not
      // with when the watcher happened to hear it (a loaded box hears it late).
      assert.ok(
        n.deadlineAt !== undefined && Math.abs(n.deadlineAt - (before + 30_000)) < 1500,
        `deadline ${n.deadlineAt} vs posted ${before} + 30 s`,
      )
      assert.deepEqual(fake.acks, [])
      await watcher.acknowledge!(n)
      assert.deepEqual(fake.acks, [id])
      const bad = await fetch(`${fake.url}/metadata/scheduledevents?api-version=2020-07-01`, {
        method: 'POST',
        headers: { Metadata: 'true' },
        body: JSON.stringify({ StartRequests: [{ EventId: 'nope' }] }),
      })
      assert.equal(bad.status, 400, 'the fake refuses an unknown EventId')
    } finally {
      await w.stop()
    }
  })

  it('url: 404 is no notice, 200 with {"seconds":N} is one, seen once', async () => {
    let body: string | undefined
    let polls = 0
    const srv = createServer((_req, res) => {
      polls++
      if (body === undefined) {
        res.writeHead(404)
        res.end()
      } else {
        res.writeHead(200)
        res.end(body)
      }
    })
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()))
    const port = (srv.address() as AddressInfo).port
    const w = watch(urlWatcher(`http://127.0.0.1:${port}/notice`, { pollMs: 20 }))
    // Counted polls, not a sleep: on a loaded box 150 ms may hold no poll at all.
    const morePolls = (n: number) => {
      const at = polls + n
      return waitUntil(`${n} more polls`, () => polls >= at)
    }
    try {
      await morePolls(3)
      assert.equal(w.notices.length, 0)
      body = '{"seconds": 12}'
      const n = await w.next()
      assert.ok(Math.abs(n.deadlineAt! - n.receivedAt - 12_000) < 5)
      await morePolls(3)
      assert.equal(w.notices.length, 1)
    } finally {
      await w.stop()
      srv.closeAllConnections()
      srv.close()
    }
  })

  it('file: the file appearing is the notice (an empty file: the window), once', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mesh-spot-'))
    const path = join(dir, 'notice')
    const w = watch(fileWatcher(path, { pollMs: 20, windowMs: 7000 }))
    try {
      await new Promise((r) => setTimeout(r, 100))
      assert.equal(w.notices.length, 0)
      writeFileSync(path, '')
      const n = await w.next()
      assert.equal(n.deadlineAt! - n.receivedAt, 7000)
      await new Promise((r) => setTimeout(r, 150))
      assert.equal(w.notices.length, 1)
    } finally {
      await w.stop()
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it('an unreachable endpoint is reported once and polled on, never thrown', async () => {
    const warnings: string[] = []
    const log = createLogger({ level: 'warn', sink: (line) => warnings.push(line) })
    // Nothing listens on port 9: every poll fails. Wait for the first warning (on a loaded box 200 ms
    // may not even hold the first poll), then let more polls fail: the warning must not repeat.
    const w = watch(awsWatcher({ endpoint: 'http://127.0.0.1:9', pollMs: 10, log }))
    await waitUntil('the first warning', () => warnings.length >= 1)
    await new Promise((r) => setTimeout(r, 200)) // deliberate: more polls fail meanwhile (fewer on a slow box: only weaker)
    await w.stop()
    assert.equal(warnings.length, 1, warnings.join('\n'))
    assert.match(warnings[0]!, /AWS metadata: .*still polling/)
  })

  it('parses --spot sources and generic notice bodies defensively', () => {
    assert.deepEqual(parseSpotSource('gcp'), { provider: 'gcp' })
    assert.deepEqual(parseSpotSource('file:/run/notice'), { provider: 'file', path: '/run/notice' })
    assert.deepEqual(parseSpotSource('url:http://x/y'), { provider: 'url', url: 'http://x/y' })
    for (const bad of ['ibm', 'url:ftp://x', 'url:nope', 'file:'])
      assert.throws(() => parseSpotSource(bad), { name: 'UsageError' })
    const n = parseGenericNotice('file', '{"time":"2030-01-01T00:00:00Z"}', 0, 30_000)
    assert.equal(n.deadlineAt, Date.parse('2030-01-01T00:00:00Z'))
    for (const bad of ['[1]', '{"time":"soon"}', '{"seconds":-1}', '{"seconds":"3"}', 'nope'])
      assert.throws(() => parseGenericNotice('url', bad, 0, 1), MetadataError)
  })
})
