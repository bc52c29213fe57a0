/**
 * Spot notices end to end: real `mesh` agents as processes in NAT'd clouds, real QEMU guests, the
 * providers' metadata protocols served by strict fakes on 169.254.169.254 inside the doomed host's
 * namespace, everything driven through the CLI.
 *
 * The clouds are on the `crosscloud` WAN profile (MESH_TEST_PROFILE overrides it).
 *
 * 1. GCP: gcp1 runs two guests (g1 busy: memcheck churn; g2 with a warm standby) and watches
 *    instance/preempted. A 30 s notice: both guests must run elsewhere before t = 30 s, placed by room,
 *    standby and provider (aws1 has room for one guest, azure1 for more; cli1 offers none; the drained
 *    bootstrap takes none); g2 goes to its standby and sends little; at t = 30 s gcp1 is cut off and
 *    everything in its namespace killed; memcheck intact on both, a client's TCP stream to each never reset.
 * 2. AWS (IMDSv2): aws1 (now g1's host) gets a spot instance-action; a request without a token is refused
 *    by the fake and the agent never sends one; g1 moves on to az1.
 * 3. Azure: az1 (now both guests' host) gets a Preempt scheduled event; nobody is left with room, which
 *    the agent reports at once; it acknowledges the event with StartRequests once its evacuation ends.
 */
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { ensureGuest } from '../../fixtures/guest/build.ts'
import { ECHO_PORT, MEMCHECK_PORT } from '../../fixtures/guest/ports.ts'
import { outputLines, waitForExit, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import type { StreamEchoResult } from '../../fixtures/testnet/stream-client.ts'
import {
  type AgentProc,
  createTestnet,
  REPO_ROOT,
  runGuestVm,
  type Testnet,
} from '../../fixtures/testnet/testnet.ts'
import { profileFromEnv } from '../../fixtures/wan/profiles.ts'
import { killHost, METADATA_IP, type NamespaceMetadata, startNamespaceMetadata } from '../helpers/spot-rig.ts'

const SUBNET = '10.97.0'
const CLIENT_IP = `${SUBNET}.1`
const GUESTS = { g1: `${SUBNET}.11`, g2: `${SUBNET}.12` } as const
const LINE_CLIENT = join(REPO_ROOT, 'test/helpers/line-client.ts')
const STREAM_CLIENT = join(REPO_ROOT, 'fixtures/testnet/stream-client.ts')
const NOTICE_S = 30

interface VmRow {
  name: string
  status: string
}

describe("spot notices across NAT'd clouds (e2e: fake metadata servers, agents, QEMU guests, CLI)", function () {
  this.timeout(900_000)
  let net: Testnet | undefined
  let client: AgentProc
  const streams = new Map<string, ReturnType<AgentProc['host']['spawn']>>()

  const memcheck = async (guest: keyof typeof GUESTS, cmd: string): Promise<string> => {
    const r = await client.host.exec(
      process.execPath,
      ['--import', 'tsx', LINE_CLIENT, GUESTS[guest], String(MEMCHECK_PORT), cmd, '60000'],
      { timeoutMs: 90_000 },
    )
    assert.equal(r.code, 0, `memcheck '${cmd}' on ${guest}: ${r.stderr}`)
    return r.stdout.trim()
  }
  const vmsOn = async (a: AgentProc) => (await a.json<{ vms: VmRow[] }>(['vm', 'ls'])).vms
  const running = async (a: AgentProc) =>
    (await vmsOn(a))
      .filter((v) => v.status === 'running')
      .map((v) => v.name)
      .sort()
  /** The agent's evacuation report line (`evacuation done …`) that follows a notice. */
  const evacuationDone = async (a: AgentProc, afterLines: number, timeoutMs: number) => {
    const t0 = Date.now()
    for (;;) {
      const line = outputLines(a.child)
        .slice(afterLines)
        .find((l) => /spot: evacuation done/.test(l))
      if (line !== undefined) return line
      if (Date.now() - t0 > timeoutMs)
        throw new Error(`no 'evacuation done' from ${a.name} within ${timeoutMs} ms`)
      await new Promise((r) => setTimeout(r, 50))
    }
  }

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft', 'qemu-system-x86_64', 'socat'] })
    const image = await ensureGuest()
    net = await createTestnet({
      clouds: [{ name: 'gcp' }, { name: 'aws' }, { name: 'azure' }, { name: 'cli' }],
      noJoin: true,
      // Between providers: 30 ms, 1 Gbit/s, 0.05% loss (MESH_TEST_PROFILE picks another).
      profile: profileFromEnv('crosscloud'),
    })
    const gcpMeta = await startNamespaceMetadata(net.topo.host('gcp1'), 'gcp')
    metas.set('gcp1', gcpMeta)
    metas.set('aws1', await startNamespaceMetadata(net.topo.host('aws1'), 'aws'))
    metas.set('azure1', await startNamespaceMetadata(net.topo.host('azure1'), 'azure'))
    await net.join('gcp1', { args: ['--spot', 'gcp', '--label', 'provider=gcp', '--label', 'price=0.01'] })
    // aws1 has room for one guest (2 × 256 MiB do not fit), azure1 for four; the client's host for none.
    await net.join('aws1', {
      args: [
        '--spot',
        'aws',
        '--spot-poll',
        '1s',
        '--label',
        'provider=aws',
        '--label',
        'price=0.02',
        '--capacity',
        'ram=400M',
      ],
    })
    await net.join('azure1', {
      args: ['--spot', 'azure', '--label', 'provider=azure', '--label', 'price=0.03', '--capacity', 'ram=1G'],
    })
    client = await net.join('cli1', {
      args: ['--tap', 'mesh0', '--address', `${CLIENT_IP}/24`, '--capacity', 'ram=0'],
    })
    await net.waitForFullMesh(['gcp1', 'aws1', 'azure1', 'cli1'], 180_000)
    // The bootstrap is a member too, with room by default: drained, it takes no VMs (mesh drain).
    const drained = await net.boot.mesh(['drain'])
    assert.equal(drained.code, 0, drained.stderr)
    const gcp1 = net.agents.get('gcp1')!
    for (const [name, ip] of Object.entries(GUESTS)) await runGuestVm(gcp1, image, { name, ip: `${ip}/24` })
    for (const g of Object.keys(GUESTS) as (keyof typeof GUESTS)[]) {
      const deadline = Date.now() + 60_000
      for (;;) {
        const r = await client.host.exec('busybox', ['ping', '-c', '1', '-W', '2', GUESTS[g]], {
          timeoutMs: 10_000,
        })
        if (r.code === 0) break
        if (Date.now() > deadline) throw new Error(`${g} unreachable from cli1: ${r.stdout}`)
      }
    }
  })
  const metas = new Map<string, NamespaceMetadata>()

  afterEach(async function () {
    if (this.currentTest?.state === 'failed' && net !== undefined)
      process.stdout.write(`${await net.diagnose()}\n`)
  })

  after(async () => {
    for (const s of streams.values()) s.kill('SIGKILL')
    await net?.destroy()
  })

  it('GCP, 30 s notice: both guests (one busy) run elsewhere before t = 30 s; the host then dies; memory and connections intact', async () => {
    const gcp1 = net!.agents.get('gcp1')!
    const aws1 = net!.agents.get('aws1')!
    const azure1 = net!.agents.get('azure1')!
    assert.match(await memcheck('g1', 'fill 16'), /^OK/)
    assert.match(await memcheck('g1', 'churn 1 8'), /^OK churn=/)
    assert.match(await memcheck('g2', 'fill 24'), /^OK/)
    // g2 gets a warm standby ('auto': where an evacuation would put it) and we wait for its first sync.
    const set = await gcp1.mesh(['vm', 'set', 'g2', '--standby', 'auto'])
    assert.equal(set.code, 0, set.stderr)
    const tSync = Date.now()
    let standby: { peerName?: string; state: string; lagBytes?: number; lagMs?: number } | undefined
    for (;;) {
      const ls = await gcp1.json<{ vms: { name: string; standby?: typeof standby }[] }>(['vm', 'ls'])
      standby = ls.vms.find((v) => v.name === 'g2')?.standby
      if (standby?.state === 'synced') break
      if (Date.now() - tSync > 180_000)
        throw new Error(`g2's standby never synced: ${JSON.stringify(standby)}`)
      await new Promise((r) => setTimeout(r, 1000))
    }
    const table = await gcp1.mesh(['vm', 'ls'])
    process.stdout.write(
      `      standby of g2 synced in ${Date.now() - tSync} ms:\n${table.stdout.replace(/^/gm, '        ')}`,
    )
    assert.match(table.stdout, /STANDBY/)
    assert.match(table.stdout, new RegExp(`g2 .*${standby.peerName} lag `))
    for (const g of Object.keys(GUESTS) as (keyof typeof GUESTS)[]) {
      const s = client.host.spawn(process.execPath, [
        '--import',
        'tsx',
        STREAM_CLIENT,
        GUESTS[g],
        String(ECHO_PORT),
        '600000',
        '30000',
      ])
      streams.set(g, s)
      await waitForLine(s, /^connected/, 60_000)
    }
    const meta = metas.get('gcp1')!
    // The agent never asked without the header (the fake answers 403 then).
    assert.ok(meta.requests().length > 0, 'the agent polls instance/preempted')
    const from = outputLines(gcp1.child).length
    const t0 = await meta.notice()
    const done = await evacuationDone(gcp1, from, NOTICE_S * 1000)
    const tDone = Date.now() - t0
    const log = outputLines(gcp1.child).slice(from)
    process.stdout.write(`      ${log.filter((l) => /spot:/.test(l)).join('\n      ')}\n`)
    assert.match(done, /complete=true/, done)
    assert.ok(tDone < NOTICE_S * 1000, `evacuated at t = ${tDone} ms`)
    // Placement: another provider each, and aws1 (room for one) got exactly one guest.
    const onAws = await running(aws1)
    const onAzure = await running(azure1)
    assert.deepEqual([...onAws, ...onAzure].sort(), ['g1', 'g2'], `aws1 ${onAws}, azure1 ${onAzure}`)
    assert.equal(onAws.length, 1, 'aws1 has room for one guest only')
    // g2 went to its standby, and sent little: the standby held most of its RAM.
    assert.ok(
      (standby.peerName === 'aws1' ? onAws : onAzure).includes('g2'),
      `g2 did not go to its standby ${standby.peerName}`,
    )
    const g2moved = log.find((l) => /VM evacuated vm=g2/.test(l))
    const g2wire = log.find((l) => /VM moved vm=g2/.test(l))?.match(/wireBytes=(\d+)/)?.[1]
    process.stdout.write(`      g2: ${g2moved}\n`)
    assert.ok(g2wire !== undefined && Number(g2wire) < 24 * 2 ** 20, `g2 put ${g2wire} bytes on the wire`)

    // t = 30 s: the spot host goes away for good, network first.
    const wait = t0 + NOTICE_S * 1000 - Date.now()
    if (wait > 0) await new Promise((r) => setTimeout(r, wait))
    await killHost(gcp1.host)
    for (const g of Object.keys(GUESTS) as (keyof typeof GUESTS)[])
      assert.match(await memcheck(g, 'check'), /^OK/)
    for (const [g, s] of streams) {
      s.kill('SIGTERM')
      await waitForExit(s, 60_000)
      const line = outputLines(s)
        .filter((l) => l.startsWith('{'))
        .at(-1)
      const res = JSON.parse(line ?? '{}') as StreamEchoResult
      process.stdout.write(
        `      ${g}: ${res.bytesEchoed} B echoed of ${res.bytesSent}, resets ${res.resets}, longest gap ${res.maxGapMs} ms\n`,
      )
      assert.equal(res.connected, true)
      assert.equal(res.resets, 0, `${g}: ${res.errors?.join(', ')}`)
      assert.equal(res.mismatches, 0)
      assert.equal(res.bytesEchoed, res.bytesSent)
    }
    streams.clear()
  })

  it('AWS IMDSv2: a request without a token is refused; the agent holds one, hears the instance-action and moves its guest', async () => {
    const aws1 = net!.agents.get('aws1')!
    const azure1 = net!.agents.get('azure1')!
    const meta = metas.get('aws1')!
    const plain = await aws1.host.exec('busybox', [
      'wget',
      '-q',
      '-O',
      '-',
      `http://${METADATA_IP}/latest/meta-data/spot/instance-action`,
    ])
    assert.notEqual(plain.code, 0, 'IMDSv2: no token, no answer')
    // The fake prints each request once it has answered it: wait for ours.
    const t401 = Date.now()
    while (!meta.requests().some((r) => r.status === 401) && Date.now() - t401 < 10_000)
      await new Promise((r) => setTimeout(r, 50))
    const refused = meta.requests().filter((r) => r.status === 401)
    assert.equal(refused.length, 1, `only our token-less request was refused: ${JSON.stringify(refused)}`)
    assert.ok(
      meta.requests().some((r) => r.method === 'PUT' && r.status === 200),
      'the agent got a token',
    )
    const guest = (await running(aws1))[0]!
    const from = outputLines(aws1.child).length
    const t0 = await meta.notice(120)
    const done = await evacuationDone(aws1, from, 60_000)
    process.stdout.write(`      notice → done in ${Date.now() - t0} ms: ${done}\n`)
    assert.match(done, /complete=true/)
    assert.ok((await running(azure1)).includes(guest))
    assert.match(await memcheck(guest as keyof typeof GUESTS, 'check'), /^OK/)
  })

  it('Azure Scheduled Events: no member has room, said at once; the agent acknowledges the Preempt with StartRequests', async () => {
    const azure1 = net!.agents.get('azure1')!
    const meta = metas.get('azure1')!
    assert.ok(
      meta.requests().every((r) => r.status === 200),
      'the agent always sends Metadata: true and an api-version',
    )
    // A Preempt of another VM is not this host's notice.
    meta.send('event Preempt some-other-vm')
    // What runs here now (both guests when the AWS test passed; judged on its own either way).
    const before = await running(azure1)
    assert.ok(before.length > 0, 'azure1 runs a guest')
    const from = outputLines(azure1.child).length
    const t0 = await meta.notice(30)
    const line = await waitForLine(azure1.child, /spot: no room for a VM/, 20_000)
    const tNoRoom = Date.now() - t0
    const done = await evacuationDone(azure1, from, 20_000)
    process.stdout.write(`      no room said ${tNoRoom} ms after the notice: ${line[0]}\n      ${done}\n`)
    assert.ok(tNoRoom < 5000, `no-room reported after ${tNoRoom} ms`)
    assert.match(done, /complete=false/)
    const t1 = Date.now()
    while (meta.acks().length === 0) {
      if (Date.now() - t1 > 10_000) throw new Error('the agent never acknowledged the event')
      await new Promise((r) => setTimeout(r, 50))
    }
    assert.equal(meta.acks().length, 1, 'only its own Preempt is acknowledged')
    assert.deepEqual(await running(azure1), before, 'nothing moved: no room anywhere')
  })
})
