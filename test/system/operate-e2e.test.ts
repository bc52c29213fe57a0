/**
 * Operating a mesh, end to end (#19): agents in three NAT'd clouds, a real QEMU guest g1 on a1.
 * - Names everywhere: c1 (host TAP, no g1) exposes g1:7 by name; the exposure is listed, carries a TCP
 *   echo, and still does after g1 moved; `mesh vm ls --all` shows where g1 runs; `vm console g1` and
 *   `vm stop g1` and `vm set g1` on a member without it act on the member that runs it (before and after the move);
 *   `expose rm` removes the exposure.
 * - The web view of a1 in a real headless Chromium (in a1's namespace) shows g1 on a1, the migration's
 *   phases while the test moves g1 to b1, and then g1 on b1.
 * - A real Prometheus in a1's namespace scrapes a1's metrics and answers for the move.
 */
import assert from 'node:assert/strict'
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import puppeteer, { type Browser, type Page } from 'puppeteer-core'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { ECHO_PORT, READY_RE } from '../../fixtures/guest/ports.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { type AgentProc, createTestnet, runGuestVm, type Testnet } from '../../fixtures/testnet/testnet.ts'
import { PROMETHEUS, type PrometheusServer, startPrometheus } from '../helpers/prometheus.ts'

const CHROMIUM = '/usr/bin/chromium'
const GUEST_IP = '10.99.0.10'
const METRICS = '127.0.0.1:9464'
const WEB = '127.0.0.1:9465'
const EXPOSED = '127.0.0.1:18080'

/** One line through a TCP echo, from inside a host's namespace. */
async function echo(host: AgentProc['host'], addr: string, line: string): Promise<string> {
  const [h, p] = addr.split(':')
  const script = `const s=require('node:net').connect(${Number(p)},'${h}');let b='';s.setTimeout(20000,()=>{console.error('timeout');process.exit(1)});s.on('data',(d)=>{b+=d;if(b.includes('\\n')){console.log(b.trim());s.destroy()}});s.on('error',(e)=>{console.error(e.message);process.exit(1)});s.write(${JSON.stringify(`${line}\n`)})`
  const r = await host.exec(process.execPath, ['-e', script], { timeoutMs: 30_000 })
  assert.equal(r.code, 0, `echo through ${addr}: ${r.stderr}`)
  return r.stdout.trim()
}

describe('operating a mesh (e2e): names everywhere, live web view in Chromium, Prometheus', function () {
  this.timeout(600_000)
  let net: Testnet | undefined
  let browser: Browser | undefined
  let prom: PrometheusServer | undefined
  let dir = ''
  let a1: AgentProc
  let b1: AgentProc
  let c1: AgentProc

  before(async function () {
    requireOrSkip(this, {
      root: true,
      commands: ['ip', 'nft', 'qemu-system-x86_64', 'socat', CHROMIUM, PROMETHEUS],
    })
    const image = await ensureGuest()
    dir = mkdtempSync(join(tmpdir(), 'mesh-operate-'))
    net = await createTestnet({ clouds: [{ name: 'a' }, { name: 'b' }, { name: 'c' }], noJoin: true })
    a1 = await net.join('a1', { args: ['--web', WEB, '--metrics', METRICS] })
    b1 = await net.join('b1')
    c1 = await net.join('c1', { args: ['--tap', 'mesh0', '--address', '10.99.0.1/24'] })
    await net.waitForFullMesh(['a1', 'b1', 'c1'], 150_000)
    await runGuestVm(a1, image, { name: 'g1', ip: `${GUEST_IP}/24` })
  })

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined)
      process.stdout.write(`${await net.diagnose()}\n`)
  })

  after(async () => {
    await browser?.close().catch(() => {})
    await prom?.stop()
    await net?.destroy()
    if (dir !== '') rmSync(dir, { recursive: true, force: true })
  })

  it('exposes g1 by name from a member that does not run it, and lists where VMs run', async () => {
    const r = await c1.json<{ target: string; listen: string }>([
      'expose',
      `g1:${ECHO_PORT}`,
      '--listen',
      EXPOSED,
    ])
    assert.equal(r.target, GUEST_IP)
    assert.equal(r.listen, EXPOSED)
    const ls = await c1.json<{ exposures: Array<{ vm: string; listen: string }> }>(['expose', 'ls'])
    assert.deepEqual(
      ls.exposures.map((e) => [e.vm, e.listen]),
      [['g1', EXPOSED]],
    )
    assert.equal(await echo(c1.host, EXPOSED, 'before the move'), 'before the move')
    const all = await c1.json<{ members: Array<{ member: string; vms: Array<{ name: string }> }> }>([
      'vm',
      'ls',
      '--all',
    ])
    const holder = all.members.filter((m) => m.vms.some((v) => v.name === 'g1')).map((m) => m.member)
    assert.deepEqual(holder, ['a1'])
    const bad = await c1.mesh(['expose', 'nosuchvm:80', '--listen', '127.0.0.1:18081'])
    assert.equal(bad.code, 1)
    assert.match(bad.stderr, /no member runs a VM named 'nosuchvm'/)
    // The console of g1, read on c1: the agent asks a1 (which runs it) for its serial console.
    const con = await c1.json<{ member: string; lines: string[] }>(['vm', 'console', 'g1', '-n', '500'])
    assert.equal(con.member, 'a1')
    const ready = con.lines.map((l) => READY_RE.exec(l)).find((m) => m !== null)
    assert.equal(
      ready?.[1],
      GUEST_IP,
      `g1's ready line not in the console read through c1: ${con.lines.slice(-5)}`,
    )
    const none = await c1.mesh(['vm', 'stop', 'nosuchvm'])
    assert.equal(none.code, 1)
    assert.match(none.stderr, /no member runs a VM named 'nosuchvm'/)
  })

  it("shows g1 moving in a1's web view (Chromium) while it moves to b1; Prometheus sees the move", async () => {
    const login = await a1.json<{ url: string }>(['web'])
    assert.match(login.url, /^http:\/\/127\.0\.0\.1:9465\/login\?token=[0-9a-f]{64}$/)
    // Chromium runs in a1's namespace (the view is on a1's loopback), driven over a pipe.
    const wrapper = join(dir, 'chromium-in-a1')
    writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${a1.host.ns} ${CHROMIUM} "$@"\n`)
    chmodSync(wrapper, 0o755)
    browser = await puppeteer.launch({
      executablePath: wrapper,
      pipe: true,
      ignoreDefaultArgs: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--remote-debugging-pipe',
        `--user-data-dir=${join(dir, 'chromium-profile')}`,
        'about:blank',
      ],
      timeout: 60_000,
    })
    const page: Page = await browser.newPage()
    await page.goto(login.url, { waitUntil: 'domcontentloaded' })
    await page.waitForSelector('[data-vm="g1"][data-on="a1"]', { timeout: 30_000 })
    await page.waitForSelector('[data-member="b1"]', { timeout: 30_000 })

    prom = await startPrometheus({
      targets: [METRICS],
      port: 9090,
      spawnIn: (cmd, args) => a1.host.spawn(cmd, args),
      get: async (url) => {
        const r = await a1.host.exec('curl', ['-sS', '--max-time', '5', url], { timeoutMs: 10_000 })
        if (r.code !== 0) throw new Error(`curl ${url}: ${r.stderr.trim()}`)
        return r.stdout
      },
    })

    // Every migration state the page shows while the move runs, in order, recorded in the page by a
    // MutationObserver (each SSE event redraws the rows): not by polling it every 50 ms, which a move
    // whose phases last less than a poll (a faster box) slips through.
    // (A string: the test's TypeScript has no DOM types.)
    await page.evaluate(`{
      window.meshSeen = []
      const note = () => {
        const s = document.querySelector('[data-migration="g1"][data-direction="out"]')?.getAttribute('data-state')
        if (s != null && window.meshSeen.at(-1) !== s) window.meshSeen.push(s)
      }
      new MutationObserver(note).observe(document.body, {
        subtree: true, childList: true, attributes: true, attributeFilter: ['data-state'],
      })
      note()
    }`)
    const moved = await a1.mesh(['migrate', 'g1', '--to', 'b1', '--json'], { timeoutMs: 300_000 })
    await page.waitForSelector('[data-migration="g1"][data-state="completed"]', { timeout: 30_000 })
    const seen = (await page.evaluate('window.meshSeen')) as string[]
    process.stdout.write(`      a1's page showed g1: ${seen.join(' → ')}\n`)
    assert.equal(moved.code, 0, moved.stderr)
    assert.ok(seen.length >= 2, `the page showed only ${JSON.stringify(seen)}`)
    assert.ok(
      seen.some((s) => ['bulk', 'precopy', 'switching', 'paused', 'committed', 'handover'].includes(s)),
      `no phase of the move was shown live: ${JSON.stringify(seen)}`,
    )
    assert.equal(seen.at(-1), 'completed')
    await page.waitForSelector('[data-vm="g1"][data-on="b1"]', { timeout: 30_000 })
    const bar = await page.$$eval('[data-migration="g1"] .seg', (els) => els.map((e) => e.textContent))
    assert.ok(bar.includes('paused'), `timeline: ${JSON.stringify(bar)}`)
    if (process.env.MESH_SCREENSHOT !== undefined)
      await page.screenshot({ path: process.env.MESH_SCREENSHOT })

    const done = await prom.waitFor(
      'mesh_migrations_total{direction="out",outcome="completed"}',
      (r) => r[0]?.value[1] === '1',
      30_000,
    )
    assert.equal(done.length, 1)
    const paused = await prom.query('mesh_migration_duration_seconds_count{direction="out",phase="paused"}')
    assert.equal(paused[0]?.value[1], '1')
    const rtt = await prom.query('mesh_link_rtt_seconds')
    const names = rtt.map((r) => r.metric.name)
    for (const n of ['b1', 'c1', 'boot'])
      assert.ok(names.includes(n), `no RTT for ${n}: ${JSON.stringify(names)}`)
  })

  it('follows g1 after its move: exposure, console and stop act on b1; rm removes the exposure', async () => {
    assert.equal(await echo(c1.host, EXPOSED, 'after the move'), 'after the move')
    // a1 ran g1 before the move: the name now leads to b1.
    const con = await a1.json<{ member: string; lines: unknown }>(['vm', 'console', 'g1'])
    assert.equal(con.member, 'b1')
    assert.ok(Array.isArray(con.lines))
    assert.equal((await c1.mesh(['expose', 'rm', EXPOSED])).code, 0)
    const ls = await c1.json<{ exposures: unknown[] }>(['expose', 'ls'])
    assert.deepEqual(ls.exposures, [])
    const again = await c1.mesh(['expose', 'rm', EXPOSED])
    assert.equal(again.code, 1)
    assert.match(again.stderr, /nothing is exposed on/)
    // Its spot settings, changed from c1: they are b1's now (b1 runs it), not c1's.
    const set = await c1.json<{ member: string; vm: string; priority: number }>([
      'vm',
      'set',
      'g1',
      '--priority',
      '7',
    ])
    assert.deepEqual([set.member, set.vm, set.priority], ['b1', 'g1', 7])
    const prio = await b1.json<{ vms: Array<{ name: string; priority?: number }> }>(['vm', 'ls'])
    assert.equal(prio.vms.find((v) => v.name === 'g1')?.priority, 7)
    const noSet = await c1.mesh(['vm', 'set', 'nosuchvm', '--priority', '1'])
    assert.equal(noSet.code, 1)
    assert.match(noSet.stderr, /no member runs a VM named 'nosuchvm'/)
    // Stopped from c1, which never ran it: b1 stops it, and no member runs it any more.
    const stopped = await c1.json<{ member: string; name: string }>(['vm', 'stop', 'g1'], {
      timeoutMs: 90_000,
    })
    assert.equal(stopped.member, 'b1')
    assert.equal(stopped.name, 'g1')
    const onB1 = await b1.json<{ vms: Array<{ name: string }> }>(['vm', 'ls'])
    assert.deepEqual(
      onB1.vms.map((v) => v.name),
      [],
    )
    const gone = await c1.mesh(['vm', 'console', 'g1'])
    assert.equal(gone.code, 1)
    assert.match(gone.stderr, /no member runs a VM named 'g1'/)
  })
})
