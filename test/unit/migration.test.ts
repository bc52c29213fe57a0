import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs'
import { mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { createMemoryNetwork, type MemoryNetwork } from '../../net/link/memory.ts'
import { createMigrationService, type MigrationService } from '../../src/agent/services/migration.ts'
import { createLogger } from '../../src/base/log.ts'
import type { Vm } from '../../vm/driver/interfaces.ts'
import { VmStateError } from '../../vm/errors.ts'
import { createFakeDriver, type FakeVm } from '../../vm/fake/driver.ts'
import { createMemoryRamCache } from '../../vm/migration/cache.ts'
import { Conversation } from '../../vm/migration/conversation.ts'
import { MigrationTargetError } from '../../vm/migration/errors.ts'
import { createDriverHost, type DriverHost } from '../../vm/migration/host.ts'
import type { MigrationChannel, MigrationNetwork, MigrationProgress } from '../../vm/migration/interfaces.ts'
import { overlayMigrationNetwork } from '../../vm/migration/overlay.ts'
import { decodeMessage, type MessageType, newSessionId } from '../../vm/migration/v1/messages.ts'
import { validateVmSpec } from '../../vm/spec.ts'
import { waitUntil } from '../helpers/wait.ts'

const MiB = 1024 * 1024
const RAM_MIB = 16
const CHUNK = 64 * 1024

/** Cuts the link the first time this side sends a message of `type` (the message is not sent). */
interface Tap {
  /** Drops everything this side sends, the link staying up (a dead agent behind a live link). */
  mute?: boolean
  cutOn?: MessageType
  /** Runs after this side sent a message of `type` (e.g. kill the other side). */
  after?: { type: MessageType; run: () => void }
  /** Channel lookups so far: each question a settle loop asks starts with one (open link or not). */
  lookups?: number
}

function tapped(net: MigrationNetwork, tap: Tap, cut: () => void): MigrationNetwork {
  const wrap = (ch: MigrationChannel): MigrationChannel => ({
    peer: ch.peer,
    get open() {
      return ch.open
    },
    send(m) {
      if (tap.mute === true) return true
      const type = decodeMessage(m).type
      if (tap.cutOn !== undefined && type === tap.cutOn) {
        tap.cutOn = undefined
        cut()
        return true
      }
      const r = ch.send(m)
      if (tap.after !== undefined && type === tap.after.type) {
        const run = tap.after.run
        tap.after = undefined
        queueMicrotask(run)
      }
      return r
    },
    drain: (s) => ch.drain(s),
    onMessage: (h) => ch.onMessage(h),
    onClose: (h) => ch.onClose(h),
  })
  return {
    self: net.self,
    channel: (p) => {
      tap.lookups = (tap.lookups ?? 0) + 1
      const c = net.channel(p)
      return c === undefined ? undefined : wrap(c)
    },
    channels: () => net.channels().map(wrap),
    onChannel: (h) => net.onChannel((c) => h(wrap(c))),
  }
}

interface Node {
  id: string
  host: DriverHost
  service: MigrationService
  network: MigrationNetwork
  ramDir: string
  tap: Tap
}

/** A guest that writes memory only while it runs (a sync check+write, so never into a paused VM). */
class Guest {
  readonly shadow: Buffer
  private timer: NodeJS.Timeout | undefined
  /** Writes that reached the guest's memory (it only writes while it runs). */
  writes = 0
  /** Migration chunks (vm/migration/source-options.ts chunkSize, 64 KiB) written since the last mark(). */
  readonly touched = new Set<number>()
  constructor(public vm: Vm) {
    this.shadow = Buffer.alloc(vm.memory.size)
  }
  write(offset: number, data: Buffer): boolean {
    if (this.vm.status() !== 'running') return false
    const fd = openSync(this.vm.memory.path, 'r+')
    try {
      writeSync(fd, data, 0, data.length, offset)
    } finally {
      closeSync(fd)
    }
    data.copy(this.shadow, offset)
    this.writes++
    for (let c = Math.floor(offset / CHUNK); c * CHUNK < offset + data.length; c++) this.touched.add(c)
    return true
  }
  mark(): void {
    this.touched.clear()
  }
  /** Fills `mib` MiB with random data, plus duplicates and zero pages. */
  fill(mib: number): void {
    const rnd = randomBytes(mib * MiB)
    assert.ok(this.write(0, rnd))
    // A second copy of the first 1 MiB (duplicate pages) further up.
    assert.ok(this.write(8 * MiB, rnd.subarray(0, MiB)))
  }
  churn(bytesPerTick: number, everyMs = 5): void {
    this.timer = setInterval(() => {
      const off = Math.floor(Math.random() * (this.vm.memory.size - bytesPerTick))
      this.write(off - (off % 4096), randomBytes(bytesPerTick))
    }, everyMs)
  }
  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer)
  }
  assertIntact(vm: Vm): void {
    const ram = readFileSync(vm.memory.path)
    if (!ram.equals(this.shadow)) {
      let first = -1
      for (let i = 0; i < ram.length; i += 4096)
        if (!ram.subarray(i, i + 4096).equals(this.shadow.subarray(i, i + 4096))) {
          first = i / 4096
          break
        }
      assert.fail(`guest memory differs from what the guest wrote (first bad page ${first})`)
    }
  }
}

describe('migration (fake driver, memory links)', function () {
  this.timeout(30_000)
  let net: MemoryNetwork
  let nodes: Map<string, Node>
  let members: Set<string>
  let root: string
  let guests: Guest[]
  /** Every session state change, per node ('A out:bulk', 'B in:receiving'...). */
  let stateLog: string[]
  const log = createLogger({ sink: () => {} })

  async function node(id: string, tuning = {}): Promise<Node> {
    const ramDir = join(root, id)
    const driver = createFakeDriver({ ramDir: root })
    const host = createDriverHost({ driver, ramDir })
    const tap: Tap = {}
    const other = (peer: string) => (id < peer ? [id, peer] : [peer, id]) as [string, string]
    const network = tapped(overlayMigrationNetwork(net.node(id)), tap, () => {
      for (const l of net.node(id).links()) net.disconnect(...other(l.peer))
    })
    const service = await startService(network, host, tuning)
    const n = { id, host, service, network, ramDir, tap }
    nodes.set(id, n)
    return n
  }

  async function startService(network: MigrationNetwork, host: DriverHost, tuning = {}) {
    const service = createMigrationService({
      network,
      host,
      cache: createMemoryRamCache(),
      log,
      isMember: (p) => members.has(p),
      onState: (e) => stateLog.push(`${network.self} ${e.direction}:${e.to}`),
      settleWaitMs: 300,
      tuning: { timeoutMs: 3000, inDoubtMs: 5000, switchBytes: 256 * 1024, rememberDelayMs: 0, ...tuning },
    })
    await service.start(new AbortController().signal)
    return service
  }

  /** The agent restarts (or was killed: stop() aborts what it was doing): VMs and records stay. */
  async function restart(n: Node, tuning = {}): Promise<void> {
    await n.service.stop()
    n.service = await startService(n.network, n.host, tuning)
  }

  const until = (what: string, ok: () => boolean, ms = 10_000) =>
    waitUntil(what, ok, { timeoutMs: ms, intervalMs: 10 })
  /** Waits for `more` questions from n's settle loop (the assertions after it have seen them unanswered). */
  const questions = (n: Node, more: number) => {
    const at = (n.tap.lookups ?? 0) + more
    return until(`${more} more settle questions from ${n.id}`, () => (n.tap.lookups ?? 0) >= at)
  }

  async function bootGuest(on: Node, name = 'g1'): Promise<Guest> {
    const driver = createFakeDriver({ ramDir: root })
    const vm = await driver.start(validateVmSpec({ name, memoryMiB: RAM_MIB, kernel: '/fake/vmlinuz' }))
    on.host.add(vm)
    const g = new Guest(vm)
    guests.push(g)
    return g
  }

  function running(name: string): Node[] {
    return [...nodes.values()].filter((n) => n.host.get(name)?.status() === 'running')
  }

  beforeEach(async () => {
    net = createMemoryNetwork()
    nodes = new Map()
    members = new Set(['A', 'B'])
    guests = []
    stateLog = []
    root = await mkdtemp(join(tmpdir(), 'mig-unit-'))
    await node('A')
    await node('B')
    net.connect('A', 'B')
  })

  afterEach(async () => {
    for (const g of guests) g.stop()
    for (const n of nodes.values()) {
      await n.service.stop()
      await n.host.stopAll()
    }
    await rm(root, { recursive: true, force: true })
  })

  it('moves A→B→A with the guest writing: memory intact, uptime continuous, the return move sends only changes', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(4)
    g.churn(4096)
    await until('the guest to write', () => g.writes >= 8)
    const events: MigrationProgress[] = []
    const up0 = (g.vm as FakeVm).uptimeMs()
    const r1 = await A.service.migrate({ vm: 'g1', to: 'B' }, { onProgress: (e) => events.push(e) })
    const onB = B.host.get('g1')!
    assert.equal(onB.status(), 'running')
    assert.equal(A.host.get('g1'), undefined)
    assert.deepEqual(
      running('g1').map((n) => n.id),
      ['B'],
    )
    g.vm = onB
    g.assertIntact(onB)
    assert.ok((onB as FakeVm).uptimeMs() >= up0, 'uptime continues')
    assert.ok(r1.wireBytes > 4 * MiB * 0.9, `first move carries the data (${r1.wireBytes})`)
    assert.ok(r1.wireBytes < 7 * MiB, `duplicates and zeros are not sent (${r1.wireBytes})`)
    assert.ok(r1.dupPageBytes >= MiB * 0.9, 'the duplicate MiB went as references')
    assert.equal(r1.token, 1)
    assert.ok(events.some((e) => e.phase === 'bulk') && events.some((e) => e.phase === 'done'))
    g.mark()
    await A.service.settled()

    const writes = g.writes
    await until('the guest to write on B', () => g.writes >= writes + 3)
    const r2 = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    assert.ok(
      r2 instanceof Error,
      'A no longer runs it: a move from A must be forwarded, and B cannot move to itself',
    )

    const r3 = await B.service.migrate({ vm: 'g1', to: 'A' })
    const onA = A.host.get('g1')!
    g.vm = onA
    g.stop()
    g.assertIntact(onA)
    assert.deepEqual(
      running('g1').map((n) => n.id),
      ['A'],
    )
    assert.equal(r3.token, 2)
    assert.ok(r3.dedupBytes > 3 * MiB, `the return move filled from A's cache (${r3.dedupBytes})`)
    // Only changes travel. A chunk the guest wrote since the first move is not in A's cache and goes whole
    // (its non-zero pages), so the wire is bounded by the chunks written (not the writes) plus the move's
    // fixed cost (offers and keys, ~0.2 MiB = 1.5% of RAM here). Not by a share of RAM alone: the guest
    // writes at wall-clock pace, so on a box 3x slower the move takes longer and more changes travel
    // (1.1 MB > 5% of RAM at load 30).
    const changed = g.touched.size * CHUNK
    process.stdout.write(
      `      return move: wire ${r3.wireBytes} B; the guest wrote ${g.touched.size} chunks since the first move (${r3.rounds} rounds, ${Math.round(r3.totalMs)} ms)\n`,
    )
    assert.ok(
      r3.wireBytes <= changed + 0.03 * RAM_MIB * MiB,
      `return move wire ${r3.wireBytes} ≤ the ${changed} B of chunks the guest wrote since the first move + 3% of RAM`,
    )
    const left = await readdir(B.ramDir).catch(() => [])
    assert.deepEqual(left, [], 'B holds no RAM file after the VM left')
  })

  it('state machines: a clean move walks both tables in order', async () => {
    const A = nodes.get('A')!
    const g = await bootGuest(A)
    g.fill(1)
    await A.service.migrate({ vm: 'g1', to: 'B' })
    await nodes.get('B')!.service.settled()
    const side = (p: string) => stateLog.filter((l) => l.startsWith(p)).map((l) => l.split(' ')[1])
    assert.deepEqual(side('A out'), [
      'out:bulk',
      'out:precopy',
      'out:switching',
      'out:paused',
      'out:committed',
      'out:handover',
      'out:completed',
    ])
    assert.deepEqual(side('B in'), ['in:receiving', 'in:loaded', 'in:committed', 'in:resumed', 'in:running'])
    assert.deepEqual(A.service.status().states, {}, 'no session left')
  })

  it("state machines: the link dies as B sends 'ready' → the source rolls back from paused, B discards", async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    B.tap.cutOn = 'ready'
    await assert.rejects(A.service.migrate({ vm: 'g1', to: 'B' }))
    await B.service.settled()
    const side = (p: string) => stateLog.filter((l) => l.startsWith(p)).map((l) => l.split(' ')[1])
    assert.deepEqual(side('A out').slice(-3), ['out:paused', 'out:rolling-back', 'out:rolled-back'])
    assert.deepEqual(side('B in').slice(-2), ['in:discarding', 'in:discarded'])
    assert.equal(A.host.get('g1')?.status(), 'running')
  })

  it('any member can trigger: a request from B for a VM on A is forwarded to A', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    const events: MigrationProgress[] = []
    const r = await B.service.migrate({ vm: 'g1', to: 'B' }, { onProgress: (e) => events.push(e) })
    assert.equal(r.to, 'B')
    assert.equal(B.host.get('g1')?.status(), 'running')
    assert.ok(events.length > 0, 'progress streamed back to the requester')
    g.vm = B.host.get('g1')!
    g.assertIntact(g.vm)
  })

  it('a request from a member with no link to the VM’s host finds it through the directory, linked on demand', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    await bootGuest(A)
    members.add('C')
    const host = createDriverHost({ driver: createFakeDriver({ ramDir: root }), ramDir: join(root, 'C') })
    const base = overlayMigrationNetwork(net.node('C'))
    const linked: string[] = []
    // C keeps no link to anyone (a member outside A's warm set); connect() builds one, as the agent's does.
    const network: MigrationNetwork = {
      self: 'C',
      channel: (p) => base.channel(p),
      channels: () => base.channels(),
      onChannel: (h) => base.onChannel(h),
      async connect(peer) {
        linked.push(peer)
        if (net.node('C').link(peer) === undefined)
          net.connect(peer < 'C' ? peer : 'C', peer < 'C' ? 'C' : peer)
      },
    }
    const asked: string[] = []
    const service = createMigrationService({
      network,
      host,
      cache: createMemoryRamCache(),
      log,
      isMember: (p) => members.has(p),
      findHost: async (vm) => {
        asked.push(vm)
        return vm === 'g1' ? 'A' : undefined
      },
      tuning: { timeoutMs: 3000, switchBytes: 256 * 1024, rememberDelayMs: 0 },
    })
    await service.start(new AbortController().signal)
    nodes.set('C', { id: 'C', host, service, network, ramDir: join(root, 'C'), tap: {} })
    const r = await service.migrate({ vm: 'g1', to: 'B' })
    assert.equal(r.to, 'B')
    assert.equal(B.host.get('g1')?.status(), 'running')
    assert.deepEqual(linked, ['A'])
    await assert.rejects(service.migrate({ vm: 'nope', to: 'B' }), MigrationTargetError)
    assert.deepEqual(asked, ['g1', 'nope'])
  })

  it('destination gone before the move starts → refused at once, saying the VM was not moved and runs on A', async () => {
    const A = nodes.get('A')!
    const g = await bootGuest(A)
    g.fill(1)
    // B's agent died just before the request (a kill 10 ms into a move did this): A's channel to B is
    // still listed but already closed.
    const channel = A.network.channel.bind(A.network)
    ;(A.network as { channel: MigrationNetwork['channel'] }).channel = (p) => {
      const c = channel(p)
      return c === undefined || p !== 'B' ? c : Object.create(c, { open: { value: false } })
    }
    const err = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    assert.ok(err instanceof Error && err.name === 'MigrationLinkError', String(err))
    assert.match(err.message, /^no link to B; not moved: VM 'g1' is running on A$/)
    assert.equal(A.host.get('g1')?.status(), 'running')
    g.stop()
    g.assertIntact(A.host.get('g1')!)
  })

  it('destination dies during pre-copy → the VM keeps running on A; B has no VM and no RAM file', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(4)
    g.churn(64 * 1024, 2)
    // B "dies" once it answered the first offer: its service stops and the link goes down.
    B.tap.after = {
      type: 'want',
      run: () => {
        net.disconnect('A', 'B')
        void B.service.stop()
      },
    }
    const err = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    assert.ok(err instanceof Error)
    assert.equal(err.name, 'MigrationLinkError')
    assert.equal(A.host.get('g1')?.status(), 'running')
    await B.service.settled()
    assert.equal(B.host.get('g1'), undefined)
    assert.deepEqual(await readdir(B.ramDir).catch(() => []), [])
    g.stop()
    g.assertIntact(A.host.get('g1')!)
  })

  for (const [side, type, expect] of [
    ['B', 'ready', 'A'],
    ['A', 'commit', 'A'],
    ['B', 'resumed', 'B'],
  ] as const) {
    it(`link cut when ${side} sends '${type}' → exactly one running copy (on ${expect}), memory intact`, async () => {
      const A = nodes.get('A')!
      const g = await bootGuest(A)
      g.fill(2)
      nodes.get(side)!.tap.cutOn = type
      // The link comes back a little later (what the source needs to learn the outcome).
      const p = A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
      await until('the link to drop', () => net.node('A').link('B') === undefined)
      await sleep(100) // deliberate: the link stays down for a while (no production timer depends on it)
      net.connect('A', 'B')
      const r = await p
      if (expect === 'B') assert.ok(!(r instanceof Error), `the move completes: ${String(r)}`)
      else assert.ok(r instanceof Error, 'the move fails')
      for (const n of nodes.values()) await n.service.settled()
      assert.deepEqual(
        running('g1').map((n) => n.id),
        [expect],
      )
      const other = expect === 'A' ? 'B' : 'A'
      assert.equal(nodes.get(other)!.host.get('g1'), undefined, `${other} holds no copy`)
      const vm = nodes.get(expect)!.host.get('g1')!
      g.assertIntact(vm)
    })
  }

  it('source dies after the destination resumed → the VM runs on B', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    B.tap.after = {
      type: 'resumed',
      run: () => {
        net.disconnect('A', 'B')
        void A.service.stop()
      },
    }
    await A.service.migrate({ vm: 'g1', to: 'B' }).catch(() => {})
    assert.equal(B.host.get('g1')?.status(), 'running')
    assert.notEqual(A.host.get('g1')?.status(), 'running')
    g.assertIntact(B.host.get('g1')!)
  })

  for (const [side, type, expect] of [
    ['A', 'commit', 'A'],
    ['B', 'resumed', 'B'],
  ] as const) {
    it(`in doubt past its budget (link cut when ${side} sends '${type}', down for long): paused, then settles on its own once the link heals (runs on ${expect})`, async () => {
      const A = nodes.get('A')!
      const B = nodes.get('B')!
      await restart(A, { inDoubtMs: 300 })
      const g = await bootGuest(A)
      g.fill(2)
      nodes.get(side)!.tap.cutOn = type
      const err = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
      assert.ok(err instanceof Error && err.name === 'MigrationInDoubtError', String(err))
      // The link is still down: the copy on A stays paused, and A neither moves it nor claims it.
      assert.equal(A.host.get('g1')?.status(), 'paused')
      assert.deepEqual(A.service.status().inDoubt as string[], ['g1'])
      assert.equal(A.host.switches().length, 1)
      const again = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
      assert.ok(again instanceof Error && (again as { code?: string }).code === 'E_MIGRATION_IN_DOUBT')
      await questions(A, 2)
      assert.equal(A.host.get('g1')?.status(), 'paused', 'still paused while nobody can answer')
      assert.deepEqual(
        running('g1').map((n) => n.id),
        expect === 'B' ? ['B'] : [],
      )
      net.connect('A', 'B')
      await until('the switch to settle', () => A.host.switches().length === 0)
      await until('the in-doubt mark to clear', () => (A.service.status().inDoubt as string[]).length === 0)
      assert.deepEqual(
        running('g1').map((n) => n.id),
        [expect],
      )
      if (expect === 'B') {
        assert.equal(A.host.get('g1'), undefined, 'A stopped and forgot its copy')
        assert.equal(g.vm.status(), 'stopped')
        assert.equal(A.host.token('g1'), 1, 'A learnt the token it lost')
      } else assert.equal(B.host.get('g1'), undefined)
      g.assertIntact(nodes.get(expect)!.host.get('g1')!)
    })
  }

  it('source agent killed after the destination resumed: the restarted agent stops its paused copy', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    // 'resumed' never reaches A (the link drops as B sends it), then A's agent dies while it asks.
    B.tap.cutOn = 'resumed'
    const p = A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    await until('the link to drop', () => net.node('A').link('B') === undefined)
    await until('B to run the VM', () => B.host.get('g1')?.status() === 'running')
    await A.service.stop()
    const err = await p
    assert.ok(err instanceof Error && err.name === 'MigrationInDoubtError', String(err))
    assert.equal(A.host.get('g1')?.status(), 'paused', 'a killed agent leaves its QEMU paused')
    assert.equal(A.host.switches().length, 1)
    assert.equal(A.host.token('g1'), 0)
    // The new agent starts while the destination is unreachable, and settles once it is back.
    A.service = await startService(A.network, A.host)
    await questions(A, 2)
    assert.equal(A.host.get('g1')?.status(), 'paused')
    net.connect('A', 'B')
    await until('the switch to settle', () => A.host.switches().length === 0)
    assert.equal(A.host.get('g1'), undefined)
    assert.equal(g.vm.status(), 'stopped', 'the stale copy was stopped, never resumed')
    assert.equal(A.host.token('g1'), 1)
    assert.deepEqual(
      running('g1').map((n) => n.id),
      ['B'],
    )
    g.assertIntact(B.host.get('g1')!)
  })

  it('source agent killed between the pause and the commit: the restarted agent resumes its copy', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    // What a kill -9 right after the pause leaves: the paused QEMU and the switch record.
    await A.host.beginSwitch({ vm: 'g1', token: 1, to: 'B', at: Date.now() })
    await g.vm.pause()
    await restart(A)
    await until('the switch to settle', () => A.host.switches().length === 0)
    assert.equal(A.host.get('g1')?.status(), 'running')
    assert.equal(B.host.get('g1'), undefined)
    assert.equal(A.host.token('g1'), 0)
    g.assertIntact(A.host.get('g1')!)
    // And it can move again afterwards.
    await A.service.migrate({ vm: 'g1', to: 'B' })
    assert.equal(B.host.get('g1')?.status(), 'running')
  })

  it('destination goes silent while the guest is paused (link still up) → the source rolls back within ~1 s, not at its 30 s timeout', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    await restart(A, { timeoutMs: 30_000, deadAfterMs: 600 })
    const g = await bootGuest(A)
    g.fill(1)
    let pausedAt = 0
    let rolledBackAt = 0
    const offState = (line: string) => {
      if (line === 'A out:paused') pausedAt = performance.now()
      if (line === 'A out:rolled-back') rolledBackAt = performance.now()
    }
    const push = stateLog.push.bind(stateLog)
    stateLog.push = (...l: string[]) => {
      for (const x of l) offState(x)
      return push(...l)
    }
    // B "dies" once the source has sent its final delta: its service stops answering, the link stays.
    A.tap.after = {
      type: 'final',
      run: () => {
        B.tap.mute = true
        void B.service.stop()
      },
    }
    const err = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    assert.ok(err instanceof Error && err.name === 'MigrationLinkError', String(err))
    assert.match(err.message, /stopped answering.*rolled back: VM 'g1' is running on A/)
    const pausedMs = rolledBackAt - pausedAt
    // The bug guarded is waiting for the 30 s timeout; ~1 s here (600 ms dead timer), a 10 s bound
    // leaves a 10× slower (loaded CI) box room and still fails on that bug.
    assert.ok(pausedMs > 0 && pausedMs < 10_000, `paused ${Math.round(pausedMs)} ms before the rollback`)
    assert.equal(A.host.get('g1')?.status(), 'running')
    g.assertIntact(A.host.get('g1')!)
  })

  /** What a destination agent killed after its commit record leaves: the incoming QEMU (paused, state
   *  loaded) and the record; the source paused with its switch record, after sending the commit. */
  async function committedThenKilled(A: Node, B: Node, g: Guest): Promise<Vm> {
    const spec = g.vm.spec
    await A.host.beginSwitch({ vm: 'g1', token: 1, to: 'B', at: Date.now() })
    await g.vm.pause()
    const state = await g.vm.saveState()
    const ram = await B.host.allocateRam(spec)
    writeFileSync(ram, readFileSync(g.vm.memory.path))
    const incoming = await B.host.startIncoming(spec, ram)
    await incoming.loadState(state)
    await B.host.ledger.commitIncoming({
      vm: 'g1',
      token: 1,
      from: 'A',
      at: Date.now(),
      handle: B.host.handle(incoming),
    })
    return incoming
  }

  it('destination agent killed between its commit record and the resume: the restarted agent re-adopts and resumes its copy; the source stops its own', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    const incoming = await committedThenKilled(A, B, g)
    assert.equal(incoming.status(), 'paused')
    await restart(B)
    assert.equal(B.host.get('g1')?.status(), 'running', 'B re-adopted and resumed the committed copy')
    assert.deepEqual(B.host.ledger.incoming(), [])
    await restart(A)
    await until('the switch to settle', () => A.host.switches().length === 0)
    assert.deepEqual(
      running('g1').map((n) => n.id),
      ['B'],
    )
    assert.equal(A.host.get('g1'), undefined)
    assert.equal(A.host.token('g1'), 1)
    assert.deepEqual(
      B.host.ledger.history('g1').map((e) => e.event),
      ['in', 'restored'],
    )
    g.assertIntact(B.host.get('g1')!)
    // And the next move works.
    const r = await B.service.migrate({ vm: 'g1', to: 'A' })
    assert.equal(r.token, 2)
  })

  it("destination's committed copy died with its agent: it answers 'lost', the source keeps its older copy paused and says so; recover --accept-loss resumes it under a newer token; the next move works", async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    const incoming = await committedThenKilled(A, B, g)
    await incoming.stop()
    await restart(B)
    assert.equal(B.host.get('g1'), undefined)
    assert.equal(B.host.ledger.lost('g1')?.token, 1)
    await restart(A)
    await until('the switch to settle', () => A.host.switches().length === 0)
    assert.equal(A.host.get('g1')?.status(), 'paused', 'the older copy is not resumed quietly')
    assert.deepEqual(A.service.status().lost, ['g1'])
    const again = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    assert.ok(
      again instanceof Error && (again as { code?: string }).code === 'E_MIGRATION_LOST',
      String(again),
    )
    assert.match(again.message, /ran on B \(fencing token 1\).*mesh vm recover g1 --accept-loss/)
    const rows = await A.service.tokens('g1')
    assert.deepEqual(
      rows.map((r) => [r.member, r.token, r.status, r.lost?.token]),
      [
        ['A', 1, 'paused', 1],
        ['B', 1, '', 1],
      ],
    )
    await assert.rejects(A.service.recover('g1', { acceptLoss: false }), { name: 'UsageError' })
    const rec = await A.service.recover('g1', { acceptLoss: true })
    assert.deepEqual(rec, { vm: 'g1', member: 'A', token: 2, resumed: true, lost: { token: 1, on: 'B' } })
    assert.equal(A.host.get('g1')?.status(), 'running')
    assert.deepEqual(A.service.status().lost, [])
    const r = await A.service.migrate({ vm: 'g1', to: 'B' })
    assert.equal(r.token, 3)
    assert.deepEqual(
      running('g1').map((n) => n.id),
      ['B'],
    )
    g.vm = B.host.get('g1')!
    g.assertIntact(g.vm)
  })

  it('a move asked for right after a restart waits for the last switch to settle, then goes ahead', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    // A kill -9 right after the switch record: the guest still runs, the record says "ask B".
    await A.host.beginSwitch({ vm: 'g1', token: 1, to: 'B', at: Date.now() })
    net.disconnect('A', 'B')
    const asked = A.tap.lookups ?? 0
    await restart(A)
    // Three unanswered questions: the settle loop now waits 1 s between them, longer than the move's
    // settleWaitMs (300): only if the move wakes it does it go ahead (not 600 ms tied to its backoff).
    await until('three unanswered settle questions', () => (A.tap.lookups ?? 0) >= asked + 3)
    assert.deepEqual(A.service.status().inDoubt, ['g1'])
    net.connect('A', 'B')
    const r = await A.service.migrate({ vm: 'g1', to: 'B' })
    assert.equal(r.token, 1)
    assert.equal(B.host.get('g1')?.status(), 'running')
  })

  it('refuses a non-member: its migrate request and its prepare', async () => {
    const A = nodes.get('A')!
    await bootGuest(A)
    net.connect('A', 'C')
    const ch = overlayMigrationNetwork(net.node('C')).channel('A')!
    const sid = newSessionId()
    const conv = new Conversation(ch, sid)
    ch.onMessage((b) => conv.deliver(decodeMessage(b), b.byteLength))
    await conv.send({ type: 'request', sid, vm: 'g1', to: 'C' })
    const res = await conv.next(['request-result'], 'result', 3000)
    assert.equal(res.ok, false)
    assert.equal(res.error?.code, 'E_NOT_MEMBER')
    const sid2 = newSessionId()
    const conv2 = new Conversation(ch, sid2)
    ch.onMessage((b) => conv2.deliver(decodeMessage(b), b.byteLength))
    const spec = validateVmSpec({ name: 'evil', memoryMiB: 16, kernel: '/k' })
    await conv2.send({
      type: 'prepare',
      sid: sid2,
      spec,
      token: 1,
      ramSize: 16 * MiB,
      chunkSize: 65536,
      pageSize: 4096,
      images: [],
    })
    const e = await conv2.next(['accept'], 'accept', 3000).catch((x: Error) => x)
    assert.ok(e instanceof Error && e.name === 'MigrationRefusedError', String(e))
    assert.equal(A.host.get('g1')?.status(), 'running')
    assert.equal(A.host.get('evil'), undefined)
    assert.equal(A.service.status().refused, 2)
  })

  it('refuses a stale fencing token; the VM keeps running on the source', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    await bootGuest(A)
    await B.host.setToken('g1', 7)
    const err = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    assert.ok(err instanceof Error && err.name === 'MigrationRefusedError', String(err))
    assert.match(err.message, /stale/)
    assert.equal(A.host.get('g1')?.status(), 'running')
    assert.equal(B.host.get('g1'), undefined)
    // The refusal says what to do, and doing it unwedges the VM.
    assert.match(err.message, /mesh vm tokens g1.*mesh vm recover g1 --accept-loss/)
    const rec = await A.service.recover('g1', { acceptLoss: true })
    assert.equal(rec.token, 8, 'newer than any member has seen')
    const r = await A.service.migrate({ vm: 'g1', to: 'B' })
    assert.equal(r.token, 9)
  })

  it('deadline: a guest that dirties faster than the link ends pre-copy in time', async function () {
    this.timeout(90_000) // two moves, the second's deadline 3× the first on a slow box
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(4)
    g.churn(256 * 1024, 1)
    // Same-run baseline: the same churning guest moved without a deadline. 4 s is ~5× what this move
    // takes on a quiet box; on a loaded one (CI, load 25: 4.69 s) the whole move is that much slower
    // and no switch policy can keep 4 s. So the deadline is 4 s, or 3× what the move just took here
    // if that is more: still a bound the move must keep, sized to the box it runs on.
    const base = await A.service.migrate({ vm: 'g1', to: 'B' })
    g.vm = B.host.get('g1')!
    const deadlineMs = Math.max(4000, Math.ceil(3 * base.totalMs))
    // --best-effort: with the default 1 s bound on the pause (and no post-copy or throttle on the fake
    // driver) the estimator may call this move infeasible when the memory link is slow (a loaded box);
    // what is tested here is the deadline's switch, which a best-effort move keeps.
    const r = await B.service.migrate({ vm: 'g1', to: 'A', deadlineMs, bestEffort: true })
    const took = `total ${r.totalMs} ms (${r.switchReason}) within the deadline of ${deadlineMs} ms (baseline ${base.totalMs} ms)`
    assert.ok(r.totalMs < deadlineMs, took)
    assert.equal(r.deadlineMs, deadlineMs)
    assert.equal(r.deadlineMissedByMs, undefined, took)
    g.stop()
    g.assertIntact(A.host.get('g1')!)
  })

  it('--best-effort past the deadline: the move completes and the report says by how much it missed', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(4)
    // B is slow to get ready (its RAM file takes 1.2 s), before anything is paused.
    const allocate = B.host.allocateRam.bind(B.host)
    B.host.allocateRam = async (spec, signal) => {
      await sleep(1200) // deliberate: the slowness under test, past the 1 s deadline
      return allocate(spec, signal)
    }
    const r = await A.service.migrate({ vm: 'g1', to: 'B', deadlineMs: 1000, bestEffort: true })
    assert.equal(r.deadlineMs, 1000)
    assert.ok(r.totalMs > 1000, `total ${r.totalMs} ms`)
    assert.ok(
      r.deadlineMissedByMs !== undefined && Math.abs(r.deadlineMissedByMs - (r.totalMs - 1000)) <= 1,
      `missed by ${r.deadlineMissedByMs} ms, total ${r.totalMs} ms`,
    )
    g.assertIntact(B.host.get('g1')!)
  })

  /**
   * A's guest as QEMU saves it: the save (its device state) ends once `release` resolves, and QEMU ends
   * every save with the guest stopped (`postmigrate`), also when a `cont` came while it ran. The final
   * scan of A's RAM fails (its file cannot be read while the save runs), like the disk's final scan
   * whose NBD connection closed in CI (disk-kills-e2e seed 776499816).
   */
  function failFinalScanDuringSave(
    vm: FakeVm,
    release: (scanFailed: Promise<void>) => Promise<unknown>,
  ): { saving: () => boolean } {
    const memory = vm.memory
    let saving = false
    let scanFailed!: () => void
    const failed = new Promise<void>((r) => {
      scanFailed = r
    })
    // The source's final scan reads memory.path while the guest is paused for the save.
    Object.defineProperty(vm, 'memory', {
      get: () => {
        if (!saving) return memory
        setImmediate(scanFailed)
        return { ...memory, path: join(root, 'gone-during-the-save') }
      },
    })
    const save = vm.saveState.bind(vm)
    vm.saveState = async (signal?: AbortSignal) => {
      saving = true
      try {
        await vm.pause(signal)
        await release(failed)
      } finally {
        saving = false
      }
      // The end of QEMU's save: stopped again, whatever came meanwhile.
      return save(signal)
    }
    return { saving: () => saving }
  }

  it('the final scan fails while the device state is saved → the rollback resumes after the save: the VM runs on A', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(1)
    const vm = g.vm as FakeVm
    let resumedDuringSave = false
    // The save ends when a rollback resumed the guest during it (the bug: QEMU then stops it again),
    // or, when nothing does (a rollback that waits for the save), 1 s after the scan failed.
    const save = failFinalScanDuringSave(vm, (scanFailed) =>
      Promise.race([
        new Promise<void>((r) => {
          const onResumed = () => {
            if (!save.saving()) return
            resumedDuringSave = true
            vm.off('resumed', onResumed)
            r()
          }
          vm.on('resumed', onResumed)
        }),
        scanFailed.then(() => sleep(1000)),
      ]),
    )
    const err = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
    assert.ok(err instanceof Error && /gone-during-the-save/.test(err.message), String(err))
    assert.equal(resumedDuringSave, false, 'the rollback resumed the guest while QEMU still saved it')
    assert.equal(A.host.get('g1')?.status(), 'running')
    await B.service.settled()
    assert.equal(B.host.get('g1'), undefined)
    g.assertIntact(A.host.get('g1')!)
  })

  it('a rollback that cannot resume the guest says so (MigrationRollbackError), never "rolled back … is paused"', async () => {
    const A = nodes.get('A')!
    const g = await bootGuest(A)
    g.fill(1)
    const vm = g.vm as FakeVm
    failFinalScanDuringSave(vm, (scanFailed) => scanFailed)
    const resume = vm.resume.bind(vm)
    let tries = 0
    vm.resume = async () => {
      tries++
      throw new VmStateError("QEMU refused 'cont'")
    }
    try {
      const err = await A.service.migrate({ vm: 'g1', to: 'B' }).catch((e: Error) => e)
      assert.ok(err instanceof Error && err.name === 'MigrationRollbackError', String(err))
      assert.equal((err as Error & { code?: string }).code, 'E_MIGRATION_ROLLBACK')
      assert.match(
        err.message,
        /the rollback could NOT resume VM 'g1' on A \(QEMU refused 'cont'\): it is paused there/,
      )
      assert.doesNotMatch(err.message, /rolled back: VM 'g1' is paused/)
      assert.ok(err.cause instanceof Error && /gone-during-the-save/.test(err.cause.message))
      assert.ok(tries > 1, `resume tried ${tries} times`)
      assert.equal(vm.status(), 'paused')
    } finally {
      vm.resume = resume
    }
  })

  it('cancel (AbortSignal) before the switch rolls back: the VM runs on A only', async () => {
    const A = nodes.get('A')!
    const B = nodes.get('B')!
    const g = await bootGuest(A)
    g.fill(4)
    const ac = new AbortController()
    A.tap.after = { type: 'offer', run: () => ac.abort(new Error('user cancel')) }
    const err = await A.service.migrate({ vm: 'g1', to: 'B' }, { signal: ac.signal }).catch((e: Error) => e)
    assert.ok(err instanceof Error && err.name === 'AbortError', String(err))
    await B.service.settled()
    assert.equal(A.host.get('g1')?.status(), 'running')
    assert.equal(B.host.get('g1'), undefined)
    assert.deepEqual(await readdir(B.ramDir).catch(() => []), [])
  })
})

describe('migration VmHost over the VM manager', () => {
  it('registers incoming VMs, forgets moved ones, and persists fencing tokens across restarts', async () => {
    const { VmManager } = await import('../../vm/manager.ts')
    const { createManagerHost } = await import('../../vm/migration/manager-host.ts')
    const dir = await mkdtemp(join(tmpdir(), 'mig-mh-'))
    try {
      const driver = createFakeDriver({ ramDir: dir })
      const manager = new VmManager({ driver, dir: join(dir, 'vms') })
      await manager.init()
      const host = await createManagerHost({ manager, driver, ramDir: join(dir, 'ram'), stateDir: dir })
      const spec = validateVmSpec({ name: 'mh', memoryMiB: 16, kernel: '/k' })
      const ram = await host.allocateRam(spec)
      const vm = await host.startIncoming(spec, ram)
      assert.equal(host.get('mh'), undefined, 'not the host’s until adopted')
      const donor = await driver.start(spec)
      await vm.loadState(await donor.saveState())
      await donor.stop()
      await vm.resume()
      await host.adopt(vm)
      assert.equal(host.get('mh'), vm)
      assert.equal((await manager.list()).length, 1)
      await host.setToken('mh', 3)
      await host.setToken('mh', 2)
      assert.equal(host.token('mh'), 3, 'never lowered')
      await vm.stop()
      await host.release('mh')
      assert.equal(host.get('mh'), undefined)
      const again = await createManagerHost({ manager, driver, ramDir: join(dir, 'ram'), stateDir: dir })
      assert.equal(again.token('mh'), 3, 'tokens survive a restart')
      const rec = { vm: 'mh', token: 4, to: 'B', at: 1 }
      await again.beginSwitch!(rec)
      const third = await createManagerHost({ manager, driver, ramDir: join(dir, 'ram'), stateDir: dir })
      assert.deepEqual(third.switches!(), [rec], 'a switch in progress survives a restart')
      await third.endSwitch!('mh')
      const fourth = await createManagerHost({ manager, driver, ramDir: join(dir, 'ram'), stateDir: dir })
      assert.deepEqual(fourth.switches!(), [])
      // The commit record, losses and history survive too; the token follows the newest of them even
      // when only the ledger file was written (the commit's single durable write).
      const handle = { spec, pid: 1, memoryPath: '/dev/shm/x', paths: { qmp: '/tmp/q' } }
      const tokensFile = () => JSON.parse(readFileSync(join(dir, 'migration-tokens.json'), 'utf8')).mh
      await fourth.ledger.commitIncoming({ vm: 'mh', token: 9, from: 'A', at: 5, handle })
      assert.equal(tokensFile(), 3, 'the commit writes the ledger only (one fsync on the critical path)')
      const fifth = await createManagerHost({ manager, driver, ramDir: join(dir, 'ram'), stateDir: dir })
      assert.equal(fifth.token('mh'), 9)
      // The destination files the token after the resume: the tokens file catches up then.
      await fifth.setToken('mh', 9)
      assert.equal(tokensFile(), 9)
      await fifth.ledger.markLost({ vm: 'other', token: 2, on: 'C', at: 6 }, 'died')
      assert.deepEqual(fifth.ledger.incoming(), [{ vm: 'mh', token: 9, from: 'A', at: 5, handle }])
      assert.deepEqual(fifth.ledger.lost('other'), { vm: 'other', token: 2, on: 'C', at: 6 })
      assert.deepEqual(
        fifth.ledger.history('mh').map((e) => [e.event, e.token, e.peer]),
        [['in', 9, 'A']],
      )
      assert.deepEqual(
        (await readdir(dir)).filter((f) => f.includes('.tmp')),
        [],
        'no temporary files left',
      )
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })
})

describe('migration leftovers of a killed destination agent', () => {
  it('sweepIncoming kills the orphaned incoming process and removes its RAM file, keeps files in use', async () => {
    const { spawn } = await import('node:child_process')
    const { writeFile } = await import('node:fs/promises')
    const { sweepIncoming } = await import('../../vm/migration/sweep.ts')
    const dir = await mkdtemp(join(tmpdir(), 'mig-sweep-'))
    const orphan = join(dir, 'g1.in-0123abcd.ram')
    const kept = join(dir, 'g2.in-89abcdef.ram')
    const other = join(dir, 'unrelated.ram')
    for (const f of [orphan, kept, other]) await writeFile(f, 'x')
    // Stands in for the incoming QEMU: a process whose command line names the RAM file. One process: `read`
    // is a shell builtin (with `sleep 30` the shell forks, and under load the sweep also found the fork,
    // still sh's command line before its exec: killedPids [sh, fork]).
    const child = spawn('sh', ['-c', 'read x', orphan], { stdio: ['pipe', 'ignore', 'ignore'] })
    const exited = new Promise<NodeJS.Signals | null>((r) => child.once('exit', (_c, s) => r(s)))
    try {
      await waitUntil('the stand-in to show the file on its command line', () =>
        readFileSync(`/proc/${child.pid}/cmdline`, 'utf8').includes(orphan),
      )
      const r = await sweepIncoming(dir, new Set([kept]))
      assert.deepEqual(r.removedFiles, [orphan])
      assert.deepEqual(r.killedPids, [child.pid])
      assert.equal(await exited, 'SIGKILL')
      assert.deepEqual((await readdir(dir)).sort(), ['g2.in-89abcdef.ram', 'unrelated.ram'])
    } finally {
      child.kill('SIGKILL')
      await rm(dir, { recursive: true, force: true })
    }
  })
})
