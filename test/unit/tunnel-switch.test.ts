import assert from 'node:assert/strict'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createMemoryNetwork, type MemoryLinkOptions, type MemoryNetwork } from '../../net/link/memory.ts'
import { type PortKind, TUNNEL_MESSAGE_BUDGET, type TunnelSwitch } from '../../net/tunnel/interfaces.ts'
import { encodeLengthPrefixed, LengthPrefixedReader } from '../../net/tunnel/stream-port.ts'
import { createSwitch, type SwitchOptions } from '../../net/tunnel/switch.ts'
import { encodeAnnounce, parseMac } from '../../net/tunnel/v1/frames.ts'
import { WaitTimeoutError, waitUntil } from '../helpers/wait.ts'

const BCAST = 'ff:ff:ff:ff:ff:ff'
/** One turn of the event loop: the memory network and the switch's batching both run on setImmediate. */
const turn = () => new Promise<void>((r) => setImmediate(r))

/** An Ethernet frame with a test ethertype and a 4-byte sequence number as payload. */
function frame(dst: string, src: string, seq = 0, size = 64): Uint8Array {
  const f = new Uint8Array(size)
  f.set(parseMac(dst), 0)
  f.set(parseMac(src), 6)
  f[12] = 0x88
  f[13] = 0xb5
  new DataView(f.buffer).setUint32(14, seq)
  return f
}
const seqOf = (f: Uint8Array) => new DataView(f.buffer, f.byteOffset).getUint32(14)

/** A local test port: records what the switch delivers and can inject frames. */
interface Nic {
  got: Uint8Array[]
  inject(f: Uint8Array): void
  remove(): Promise<void>
}
function nic(sw: TunnelSwitch, id: string, kind: PortKind = 'local'): Nic {
  const got: Uint8Array[] = []
  let receive!: (f: Uint8Array) => void
  const remove = sw.addPort(id, kind, (r) => {
    receive = r
    return {
      send: (f) => {
        got.push(f.slice())
        return true
      },
      close: () => {},
    }
  })
  return { got, inject: (f) => receive(f), remove }
}

/** A fake QEMU `-netdev stream,server=on`: one client at a time, length-prefixed frames. */
interface FakeQemu {
  path: string
  got: Uint8Array[]
  send(f: Uint8Array): void
  connected(): Promise<void>
  close(): Promise<void>
}
async function fakeQemu(dir: string, name: string): Promise<FakeQemu> {
  const path = join(dir, `${name}.sock`)
  const got: Uint8Array[] = []
  let client: Socket | undefined
  let waiters: Array<() => void> = []
  const server: Server = createServer((s) => {
    client = s
    const r = new LengthPrefixedReader((f) => got.push(Buffer.from(f)))
    s.on('data', (c: Buffer) => r.push(c))
    s.on('error', () => {})
    for (const w of waiters) w()
    waiters = []
  })
  await new Promise<void>((res) => server.listen(path, res))
  return {
    path,
    got,
    send: (f) => client?.write(encodeLengthPrefixed(f)),
    connected: () => (client !== undefined ? Promise.resolve() : new Promise((r) => waiters.push(r))),
    close: () =>
      new Promise<void>((res) => {
        client?.destroy()
        server.close(() => res())
      }),
  }
}

const until = (cond: () => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> =>
  waitUntil(what, cond, { timeoutMs, intervalMs: 5 })

/** Full mesh of switches over the memory network. */
function mesh(names: string[], link: MemoryLinkOptions = {}, opts: Partial<SwitchOptions> = {}) {
  const net: MemoryNetwork = createMemoryNetwork()
  const sws = new Map<string, TunnelSwitch>()
  for (const n of names) {
    const sw = createSwitch({ overlay: net.node(n), ...opts })
    sw.start()
    sws.set(n, sw)
  }
  for (let i = 0; i < names.length; i++)
    for (let j = i + 1; j < names.length; j++) net.connect(names[i]!, names[j]!, link)
  /** Bytes queued on any tunnel channel right now. */
  const inFlight = () =>
    names.some((n) =>
      names.some((p) => {
        const l = net.node(n).link(p)
        return l !== undefined && l.state === 'open' && l.channel('tunnel').bufferedAmount > 0
      }),
    )
  return {
    net,
    sw: (n: string) => sws.get(n)!,
    stop: () => Promise.all([...sws.values()].map((s) => s.stop())),
    /**
     * Resolves once nothing is in flight between the switches: no channel held a byte for 5 turns in a
     * row (a switch's batch is sent the turn after it is made, a channel delivers the turn after it is
     * sent). A "nothing else arrives" assertion needs this, not a sleep.
     */
    quiet: async () => {
      const end = Date.now() + 5000
      for (let idle = 0; idle < 5; ) {
        if (Date.now() > end) throw new WaitTimeoutError('the switches never went quiet (frames loop?)')
        await turn()
        idle = inFlight() ? 0 : idle + 1
      }
    },
  }
}

/** The switch's vm port for a guest: connected to its QEMU socket, frames written to it. */
const vmPort = (sw: TunnelSwitch) => sw.status().ports.find((p) => p.kind === 'vm')

const X = '52:54:00:00:00:0a'
const Y = '52:54:00:00:00:0b'
const Z = '52:54:00:00:00:0c'
const V = '52:54:00:00:00:99'

describe('tunnel switch (memory network)', function () {
  this.timeout(30_000)
  let cleanup: Array<() => unknown> = []
  afterEach(async () => {
    for (const c of cleanup.reverse()) await c()
    cleanup = []
  })

  it('learns MAC locations: unknown unicast floods, replies go only where the MAC is', async () => {
    const m = mesh(['a', 'b', 'c'])
    cleanup.push(m.stop)
    const x = nic(m.sw('a'), 'x')
    const y = nic(m.sw('b'), 'y')
    const z = nic(m.sw('c'), 'z')
    x.inject(frame(Y, X, 1)) // Y unknown at a: flooded to b and c
    await until(() => y.got.length === 1 && z.got.length === 1, 5000, 'flood')
    assert.equal(m.sw('b').lookup(X), 'peer:a')
    y.inject(frame(X, Y, 2)) // X learned at b: unicast to a only
    await until(() => x.got.length === 1, 5000, 'reply')
    await m.quiet()
    assert.equal(z.got.length, 1, 'c saw only the first flood')
    assert.equal(m.sw('a').lookup(Y), 'peer:b')
    x.inject(frame(Y, X, 3))
    await until(() => y.got.length === 2)
    await m.quiet()
    assert.equal(z.got.length, 1, 'learned unicast is not flooded')
    const st = m.sw('a').status()
    const pb = st.ports.find((p) => p.id === 'peer:b')!
    assert.equal(pb.txFrames, 2)
    assert.equal(pb.rxFrames, 1)
    assert.equal(st.mtu, 1184)
  })

  it('sends the small frames of one event-loop turn as one BATCH message, big frames alone, all delivered in order', async () => {
    const m = mesh(['a', 'b'])
    cleanup.push(m.stop)
    const x = nic(m.sw('a'), 'x')
    const y = nic(m.sw('b'), 'y')
    x.inject(frame(Y, X, 0))
    await until(() => y.got.length === 1)
    y.inject(frame(X, Y, 0)) // both MACs learned: unicast from here on
    await until(() => x.got.length === 1)
    const wire: Array<{ type: number; bytes: number }> = []
    m.net
      .node('b')
      .link('a')!
      .channel('tunnel')
      .onMessage((msg) => wire.push({ type: msg[1]!, bytes: msg.byteLength }))
    // 30 ACK-sized frames, one full-size frame in the middle, then 5 more small ones, in one turn.
    for (let i = 1; i <= 30; i++) x.inject(frame(Y, X, i, 66))
    x.inject(frame(Y, X, 31, 1198))
    for (let i = 32; i <= 36; i++) x.inject(frame(Y, X, i, 66))
    await until(() => y.got.length === 37)
    assert.deepEqual(
      y.got.slice(1).map(seqOf),
      Array.from({ length: 36 }, (_, i) => i + 1),
      'in order',
    )
    assert.deepEqual(
      wire.map((w) => w.type),
      [4, 4, 1, 4],
      '30 small frames need two batches (16 fit one message), then the big frame, then the rest',
    )
    for (const w of wire) assert.ok(w.bytes <= TUNNEL_MESSAGE_BUDGET)
    const pa = m
      .sw('a')
      .status()
      .ports.find((p) => p.id === 'peer:b')!
    assert.equal(pa.txFrames, 37)
    const pb = m
      .sw('b')
      .status()
      .ports.find((p) => p.id === 'peer:a')!
    assert.equal(pb.rxFrames, 37)
    // A lone small frame still travels as a plain FRAME (any v1 member reads it).
    x.inject(frame(Y, X, 37, 66))
    await until(() => y.got.length === 38)
    assert.equal(wire.at(-1)!.type, 1)
  })

  it('counts a batch the channel refuses as dropped frames', async () => {
    const m = mesh(['a', 'b'], { highWaterMark: 4096 })
    cleanup.push(m.stop)
    const x = nic(m.sw('a'), 'x')
    for (let i = 0; i < 200; i++) x.inject(frame(BCAST, X, i, 100))
    await m.quiet()
    const pa = m
      .sw('a')
      .status()
      .ports.find((p) => p.id === 'peer:b')!
    assert.ok(pa.drops > 0, 'some batches did not fit the channel')
    assert.equal(pa.txFrames + pa.drops, 200)
  })

  it('floods broadcast exactly once to every port, never relays between remote ports (4 nodes, split horizon)', async () => {
    const names = ['a', 'b', 'c', 'd']
    const m = mesh(names)
    cleanup.push(m.stop)
    const nics = names.map((n) => [nic(m.sw(n), `${n}1`), nic(m.sw(n), `${n}2`)] as const)
    nics[0]![0].inject(frame(BCAST, X, 42))
    await m.quiet()
    assert.equal(nics[0]![0].got.length, 0, 'not back to the sender')
    assert.equal(nics[0]![1].got.length, 1)
    for (let i = 1; i < 4; i++)
      for (const n of nics[i]!) assert.equal(n.got.length, 1, `exactly one copy at ${names[i]}`)
    for (const n of names.slice(1)) {
      const remoteTx = m
        .sw(n)
        .status()
        .ports.filter((p) => p.kind === 'remote')
        .reduce((s, p) => s + p.txFrames, 0)
      assert.equal(remoteTx, 0, `${n} relayed nothing to other members`)
    }
    // Unknown unicast from a remote port is flooded locally only, too.
    const remoteTx = (n: string) =>
      m
        .sw(n)
        .status()
        .ports.filter((p) => p.kind === 'remote')
        .reduce((s, p) => s + p.txFrames, 0)
    const before = ['a', 'c', 'd'].map(remoteTx)
    nics[1]![0].inject(frame(Z, Y, 43))
    await m.quiet()
    assert.deepEqual(['a', 'c', 'd'].map(remoteTx), before)
    for (const i of [0, 2, 3]) for (const n of nics[i]!) assert.equal(n.got.at(-1)?.[0], 0x52)
    assert.equal(remoteTx('b'), 3, 'b flooded its own frame to each member once')
  })

  it('a flood of frames to and from random MACs keeps the table and queues bounded', async () => {
    const m = mesh(['a', 'b'], { highWaterMark: 64 * 1024 }, { maxMacs: 256 })
    cleanup.push(m.stop)
    const x = nic(m.sw('a'), 'x')
    let bDelivered = 0
    m.sw('b').addPort('sink', 'local', () => ({
      send: () => {
        bDelivered++
        return true
      },
      close: () => {},
    }))
    const rnd = () =>
      `52:54:${Array.from({ length: 4 }, () =>
        Math.floor(Math.random() * 256)
          .toString(16)
          .padStart(2, '0'),
      ).join(':')}`
    global.gc?.()
    const heap0 = process.memoryUsage().heapUsed
    let maxBuffered = 0
    const ch = m.net.node('a').link('b')!.channel('tunnel')
    for (let round = 0; round < 12; round++) {
      for (let i = 0; i < 5000; i++) x.inject(frame(rnd(), rnd(), i, 1000))
      maxBuffered = Math.max(maxBuffered, ch.bufferedAmount)
      await turn() // the channel drains between rounds, as a link would
    }
    await m.quiet()
    const st = m.sw('a').status()
    assert.ok(st.macs <= 256, `table bounded (${st.macs})`)
    assert.ok((st.drops.evicted ?? 0) > 50_000, 'old entries were evicted')
    assert.ok(maxBuffered <= 64 * 1024, `channel queue bounded (${maxBuffered})`)
    const peer = st.ports.find((p) => p.id === 'peer:b')!
    assert.ok(peer.drops > 0, 'frames beyond the channel budget were dropped, not queued')
    assert.ok(m.sw('b').status().macs <= 256)
    assert.ok(bDelivered > 0)
    global.gc?.()
    const grew = process.memoryUsage().heapUsed - heap0
    assert.ok(grew < 64 * 1024 * 1024, `heap grew ${grew} bytes for 60k frames`)
  })

  it('drops oversize frames and counts undecodable messages', async () => {
    const m = mesh(['a', 'b'])
    cleanup.push(m.stop)
    const x = nic(m.sw('a'), 'x')
    const y = nic(m.sw('b'), 'y')
    x.inject(frame(BCAST, X, 1, 1199))
    x.inject(frame(BCAST, X, 2, 1198))
    const ch = m.net.node('b').link('a')!.channel('tunnel')
    ch.send(new Uint8Array([9, 9, 9]))
    ch.send(new Uint8Array([1, 7, 0, 0]))
    await until(() => y.got.length === 1)
    await m.quiet()
    assert.equal(seqOf(y.got[0]!), 2)
    assert.equal(m.sw('a').status().drops.oversize, 1)
    assert.equal(m.sw('a').status().drops['decode-version'], 1)
    assert.equal(m.sw('a').status().drops['decode-type'], 1)
  })

  describe('VM moves', () => {
    let dir: string
    beforeEach(() => {
      dir = mkdtempSync(join(tmpdir(), 'mesh-tunnel-'))
    })
    afterEach(() => rmSync(dir, { recursive: true, force: true }))

    /** Guest V running on member a (attached, announced, connected), and a QEMU on b to move it to. */
    async function guestOnA(m: ReturnType<typeof mesh>): Promise<{ qa: FakeQemu; qb: FakeQemu }> {
      const qa = await fakeQemu(dir, 'a')
      const qb = await fakeQemu(dir, 'b')
      cleanup.push(
        () => qa.close(),
        () => qb.close(),
      )
      m.sw('a').attachVm(V, qa.path)
      m.sw('a').announce(V)
      await qa.connected()
      return { qa, qb }
    }

    it('talks to QEMU over its stream socket and reconnects when the socket comes back', async () => {
      const m = mesh(['a', 'b'])
      cleanup.push(m.stop)
      let q = await fakeQemu(dir, 'vm')
      cleanup.push(() => q.close())
      m.sw('a').attachVm(V, q.path)
      await q.connected()
      const y = nic(m.sw('b'), 'y')
      q.send(frame(BCAST, V, 1))
      await until(() => y.got.length === 1, 5000, 'frame from the VM')
      y.inject(frame(V, Y, 2))
      await until(() => q.got.length === 1, 5000, 'frame to the VM')
      assert.equal(seqOf(q.got[0]!), 2)
      // QEMU restarts its server side (or the connection drops): the port dials again.
      await q.close()
      q = await fakeQemu(dir, 'vm')
      await q.connected()
      await until(() => vmPort(m.sw('a'))?.connected === true, 5000, 'the vm port connected again')
      y.inject(frame(V, Y, 3))
      await until(() => q.got.length === 1, 5000, 'frame after reconnect')
      const st = m
        .sw('a')
        .status()
        .ports.find((p) => p.kind === 'vm')!
      assert.equal(st.connected, true)
      assert.equal(st.detail, V)
    })

    it('moves a MAC at once, forwards stragglers during the grace period, and ignores stale announcements', async () => {
      // The switches' clock is the test's: the grace period ends when the test says so, not after 2 s.
      let skewMs = 0
      const m = mesh(['a', 'b', 'c'], {}, { graceMs: 2000, now: () => Date.now() + skewMs })
      cleanup.push(m.stop)
      const { qa, qb } = await guestOnA(m)
      const x = nic(m.sw('c'), 'x')
      qa.send(frame(BCAST, V, 0))
      await until(() => x.got.length === 1 && m.sw('c').lookup(V) === 'peer:a')
      // a's announcement repeats must be over, so the stale count below is exact.
      await until(() => m.sw('a').status().announcesPending === 0, 5000, "a's announcement repeats")
      let seq = 1
      const sendBurst = (n: number) => {
        for (let i = 0; i < n; i++) x.inject(frame(V, X, seq++))
      }
      sendBurst(20)
      await until(() => qa.got.length === 20, 5000, 'frames at A')
      // Migration: the source lets go of the NIC; c still sends to a; a holds those frames.
      await m.sw('a').detachVm(V)
      sendBurst(10)
      await m.quiet()
      assert.equal(m.sw('a').lookup(V), 'held')
      // Destination plugs the NIC in and announces: a forwards what it held, c switches to b at once.
      m.sw('b').attachVm(V, qb.path)
      await qb.connected()
      const epoch = m.sw('b').announce(V)
      await until(() => m.sw('c').lookup(V) === 'peer:b', 5000, 'c moved V to b')
      assert.equal(m.sw('a').lookup(V), 'peer:b')
      await until(() => qb.got.length === 10, 5000, 'held frames forwarded to b')
      sendBurst(10)
      await until(() => qb.got.length === 20, 5000, 'new frames straight to b')
      // A late frame that reached a during the grace period is forwarded, once.
      m.net
        .node('c')
        .link('a')!
        .channel('tunnel')
        .send(new Uint8Array([1, 1, ...frame(V, X, seq++)]))
      await until(() => qb.got.length === 21, 5000, 'straggler forwarded')
      // Every frame delivered exactly once, none lost, none duplicated.
      const all = [...qa.got, ...qb.got].map(seqOf).sort((p, q) => p - q)
      assert.deepEqual(
        all,
        Array.from({ length: seq - 1 }, (_, i) => i + 1),
      )
      // A stale announcement (lower epoch) cannot move it back; nor can a late frame from the old host.
      const stale = encodeAnnounce(V, epoch - 1)
      const staleBefore = m.sw('c').status().drops['stale-announce'] ?? 0
      m.net.node('a').link('c')!.channel('tunnel').send(stale)
      m.net
        .node('a')
        .link('c')!
        .channel('tunnel')
        .send(new Uint8Array([1, 1, ...frame(BCAST, V, 999)]))
      await m.quiet()
      assert.equal(m.sw('c').lookup(V), 'peer:b')
      assert.equal(m.sw('c').status().drops['stale-announce'], staleBefore + 1)
      // Forwarded frames are never relayed again (no loops even if two switches disagree).
      const fa = m
        .sw('a')
        .status()
        .ports.find((p) => p.id === 'peer:c')!
      assert.equal(fa.txFrames, 1, 'a sent c only the initial broadcast')
      // After the grace period a forgets the move (and not before).
      assert.equal(m.sw('a').status().movedAway, 1)
      skewMs = 2001
      await until(() => m.sw('a').status().movedAway === 0, 5000, 'the sweeper to forget the move')
    })

    it('a member whose link comes up after an announcement still learns where the MAC went', async () => {
      const m = mesh(['a', 'b', 'c'])
      cleanup.push(m.stop)
      const { qa, qb } = await guestOnA(m)
      await until(() => m.sw('c').lookup(V) === 'peer:a', 5000, 'c knows V at a')
      // b's agent restarted: no links yet when it re-adopts the guest and announces it.
      m.net.disconnect('b', 'c')
      m.net.disconnect('a', 'b')
      await m.sw('a').detachVm(V)
      void qa
      m.sw('b').attachVm(V, qb.path)
      await qb.connected()
      m.sw('b').announce(V)
      await until(() => m.sw('b').status().announcesPending === 0, 5000, 'every repeat went out, to nobody')
      await m.quiet()
      assert.equal(m.sw('c').lookup(V), 'peer:a', 'c has not heard yet')
      m.net.connect('b', 'c')
      m.net.connect('a', 'b')
      await until(() => m.sw('c').lookup(V) === 'peer:b', 5000, 'c learns V at b once the link is up')
      await until(() => m.sw('a').lookup(V) === 'peer:b', 5000, 'a too')
    })

    it('a migration destination that attached the NIC does not take the MAC before it announces', async () => {
      const m = mesh(['a', 'b'])
      cleanup.push(m.stop)
      const { qa, qb } = await guestOnA(m)
      await until(() => m.sw('b').lookup(V) === 'peer:a')
      const y = nic(m.sw('b'), 'y')
      m.sw('b').attachVm(V, qb.path) // incoming VM, paused, during pre-copy
      await qb.connected()
      y.inject(frame(V, Y, 1))
      await until(() => qa.got.length === 1, 5000, 'frame still goes to the source')
      assert.equal(qb.got.length, 0)
      m.sw('b').announce(V) // resumed here
      y.inject(frame(V, Y, 2))
      await until(() => qb.got.length === 1, 5000, 'frame goes to the destination')
      await until(() => m.sw('a').lookup(V) === 'peer:b', 5000, 'a learned the move')
    })

    it('holds frames for a paused guest and hands them, in order, to its new host on its announcement', async () => {
      const m = mesh(['a', 'b', 'c'])
      cleanup.push(m.stop)
      const { qa, qb } = await guestOnA(m)
      await until(() => vmPort(m.sw('a'))?.connected === true, 5000, "a's vm port connected")
      const x = nic(m.sw('c'), 'x') // a client in a third member
      const w = nic(m.sw('a'), 'w') // a host TAP next to the source
      x.inject(frame(BCAST, X, 0))
      w.inject(frame(BCAST, Z, 0))
      await until(() => m.sw('c').lookup(V) === 'peer:a' && m.sw('b').lookup(X) === 'peer:c')
      await until(() => qa.got.length === 2, 5000, 'both broadcasts at the guest')
      // The destination plugs the incoming NIC in, holding: the guest does not run there yet.
      m.sw('b').attachVm(V, qb.path, { hold: true })
      await qb.connected()
      // Switch-over: the guest pauses on a. What reaches a for it now waits in a, not in QEMU.
      m.sw('a').holdVm(V)
      for (let i = 1; i <= 10; i++) x.inject(frame(V, X, i))
      w.inject(frame(V, Z, 11))
      await until(() => m.sw('a').status().held === 11, 5000, 'held at a')
      await m.quiet() // (its socket is polled on each of those turns: a frame written to it would be here)
      assert.equal(qa.got.length, 2, 'nothing written into the paused QEMU')
      // The guest resumes on b and b announces: a sends what it held there at once.
      m.sw('b').resumeVm(V)
      m.sw('b').announce(V)
      await until(() => qb.got.length === 11, 5000, 'held frames at b')
      // The same order from each source (a sends them in order; the channel itself is unordered).
      assert.deepEqual(
        qb.got.map(seqOf).filter((n) => n <= 10),
        Array.from({ length: 10 }, (_, i) => i + 1),
      )
      assert.deepEqual(
        qb.got.map(seqOf).sort((p, q) => p - q),
        Array.from({ length: 11 }, (_, i) => i + 1),
      )
      assert.equal(m.sw('a').status().held, 0)
      // Relayed frames from c came as FORWARDED: b did not learn that X sits behind a.
      assert.equal(m.sw('b').lookup(X), 'peer:c')
      // The TAP frame came from a local port of a: b learns Z there, correctly.
      assert.equal(m.sw('b').lookup(Z), 'peer:a')
      x.inject(frame(V, X, 12))
      await until(() => qb.got.length === 12, 5000, 'new frames straight to b')
      assert.equal(qa.got.length, 2)
    })

    it('a move that rolls back: held frames reach the guest here when it resumes; the queue is bounded', async () => {
      const m = mesh(['a', 'c'], {}, { holdFrames: 8 })
      cleanup.push(m.stop)
      const qa = await fakeQemu(dir, 'a')
      cleanup.push(() => qa.close())
      m.sw('a').attachVm(V, qa.path)
      m.sw('a').announce(V)
      await qa.connected()
      const x = nic(m.sw('c'), 'x')
      await until(() => m.sw('c').lookup(V) === 'peer:a')
      m.sw('a').holdVm(V)
      m.sw('a').holdVm(V) // idempotent: does not drop what is held
      for (let i = 1; i <= 20; i++) x.inject(frame(V, X, i))
      await until(() => (m.sw('a').status().drops['hold-full'] ?? 0) === 12, 5000, 'tail drop')
      assert.equal(m.sw('a').status().held, 8)
      assert.equal(qa.got.length, 0)
      m.sw('a').resumeVm(V)
      await until(() => qa.got.length === 8, 5000, 'held frames delivered here')
      assert.deepEqual(qa.got.map(seqOf), [1, 2, 3, 4, 5, 6, 7, 8])
      x.inject(frame(V, X, 21))
      await until(() => qa.got.length === 9, 5000, 'running again: straight through')
      assert.equal(m.sw('a').status().held, 0)
      // A byte budget bounds it too (frames of 1000 bytes, 2500 bytes allowed: 2 held).
      const m2 = mesh(['a', 'c'], {}, { holdBytes: 2500 })
      cleanup.push(m2.stop)
      const q2 = await fakeQemu(dir, 'a2')
      cleanup.push(() => q2.close())
      m2.sw('a').attachVm(V, q2.path, { hold: true })
      await q2.connected()
      await until(() => vmPort(m2.sw('a'))?.connected === true, 5000, 'the vm port connected')
      const x2 = nic(m2.sw('a'), 'x2')
      for (let i = 1; i <= 5; i++) x2.inject(frame(V, X, i, 1000))
      assert.equal(m2.sw('a').status().held, 2)
      m2.sw('a').resumeVm(V)
      await until(() => q2.got.length === 2, 5000, 'byte-bounded hold delivered')
    })

    it('a paused guest that is detached before its new host is known keeps its frames for that host', async () => {
      const m = mesh(['a', 'b', 'c'])
      cleanup.push(m.stop)
      const { qb } = await guestOnA(m)
      const x = nic(m.sw('c'), 'x')
      await until(() => m.sw('c').lookup(V) === 'peer:a')
      m.sw('a').holdVm(V)
      for (let i = 1; i <= 3; i++) x.inject(frame(V, X, i))
      await until(() => m.sw('a').status().held === 3)
      await m.sw('a').detachVm(V)
      x.inject(frame(V, X, 4))
      await until(() => m.sw('a').status().held === 4, 5000, 'still held after detach')
      m.sw('b').attachVm(V, qb.path)
      await qb.connected()
      m.sw('b').announce(V)
      await until(() => qb.got.length === 4, 5000, 'all held frames at b')
      assert.deepEqual(qb.got.map(seqOf), [1, 2, 3, 4])
    })

    it('announcements get through a lossy channel (repeats) and the move still completes', async () => {
      let s = 1
      const random = () => {
        s = (s * 48271) % 2147483647
        return s / 2147483647
      }
      const m = mesh(['a', 'b', 'c'], { lossRate: 0.5, random })
      cleanup.push(m.stop)
      const qb = await fakeQemu(dir, 'b')
      cleanup.push(() => qb.close())
      m.sw('b').attachVm(V, qb.path)
      m.sw('b').announce(V)
      await until(
        () => m.sw('a').lookup(V) === 'peer:b' && m.sw('c').lookup(V) === 'peer:b',
        3000,
        'announce',
      )
    })
  })
})
