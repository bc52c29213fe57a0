/**
 * The clouds fixture's WAN profiles (fixtures/wan): a path between two clouds on a profile has its RTT,
 * a path to a host in the middle half of it, mixed profiles average, the loss is applied at the rate
 * without reordering, the rate is capped, congestion control is set per cloud, and destroy() removes
 * the emulator with the namespaces. Measured on a shared, noisy 2-core machine: the tolerances allow
 * for scheduling delay on top of the profile (never below it).
 */
import assert from 'node:assert/strict'
import { createClouds, type Host, type Topology, waitForLine } from '../../fixtures/testnet/clouds.ts'
import { listNetns } from '../../fixtures/testnet/netns.ts'
import { requireOrSkip } from '../../fixtures/testnet/prereq.ts'
import { INTERNET_CORE_IP } from '../../fixtures/wan/measure.ts'
import { PROFILES, uplinkShape, type WanProfile } from '../../fixtures/wan/profiles.ts'

// Cheap to push through (100 Mbit), lossy enough to count in a few thousand packets, jittery enough
// that a reordering emulator would show it.
const LOSSY: WanProfile = { name: 'lossy', rttMs: 10, rateMbit: 100, lossPct: 2, jitterMs: 2 }

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  return s[s.length >> 1]!
}

async function pingMs(from: Host, ip: string, count = 12): Promise<number> {
  const r = await from.exec('busybox', ['ping', '-c', String(count), '-i', '0.05', '-W', '3', ip], {
    timeoutMs: 30_000,
  })
  const times = [...r.stdout.matchAll(/time=([\d.]+) ms/g)].map((m) => Number(m[1]))
  assert.ok(times.length >= count - 2, `${from.name} → ${ip}: ${times.length} of ${count} replies`)
  return median(times.slice(1))
}

/** Within the profile, plus what a loaded machine adds: never more than 1.5 ms below it. */
function assertRtt(what: string, got: number, expected: number): void {
  assert.ok(
    got >= expected - 1.5 && got <= expected * 1.25 + 4,
    `${what}: RTT ${got} ms, expected ${expected} ms`,
  )
}

interface UdpResult {
  mbit: number
  lostPct: number
  packets: number
  outOfOrder: number
}

/**
 * iperf3 UDP from `from` to `to` (server spawned there) at `mbit` for `seconds`. iperf3 sets a UDP stream
 * up with one datagram each way and never resends it (esnet/iperf#862): on a lossy profile that handshake
 * is itself lost now and then ("unable to read from stream socket"), before any measurement starts. Such a
 * run measured nothing, so it is run again (a fresh server, up to 3 tries); every other error fails.
 */
async function udp(from: Host, to: Host, mbit: number, seconds: number, port: number): Promise<UdpResult> {
  for (let attempt = 1; ; attempt++) {
    const r = await udpOnce(from, to, mbit, seconds, port)
    if (r.error === undefined) return r.result
    const setupLost = /unable to read from stream socket/.test(r.error)
    assert.ok(setupLost && attempt < 3, `iperf3 (try ${attempt}): ${r.error}`)
    process.stdout.write(`      iperf3 UDP setup datagram lost (try ${attempt}): running again\n`)
  }
}

async function udpOnce(
  from: Host,
  to: Host,
  mbit: number,
  seconds: number,
  port: number,
): Promise<{ error: string; result?: undefined } | { error?: undefined; result: UdpResult }> {
  const server = to.spawn('iperf3', ['-s', '-1', '--forceflush', '-p', String(port)])
  try {
    await waitForLine(server, /Server listening/, 10_000)
    // exec, not run: iperf3 reports its errors in the JSON, whatever its exit status.
    const r = await from.exec(
      'iperf3',
      ['-u', '-c', to.ip, '-p', String(port), '-b', `${mbit}M`, '-l', '1400', '-t', String(seconds), '-J'],
      { timeoutMs: (seconds + 30) * 1000 },
    )
    assert.ok(!r.timedOut, `iperf3 timed out: ${r.stderr}`)
    const j = JSON.parse(r.stdout) as {
      error?: string
      end: {
        sum_received: { bits_per_second: number; lost_percent: number; packets: number }
        streams: { udp: { out_of_order: number } }[]
      }
    }
    if (j.error !== undefined) return { error: j.error }
    return {
      result: {
        mbit: j.end.sum_received.bits_per_second / 1e6,
        lostPct: j.end.sum_received.lost_percent,
        packets: j.end.sum_received.packets,
        outOfOrder: j.end.streams[0]?.udp.out_of_order ?? -1,
      },
    }
  } finally {
    server.kill('SIGKILL')
  }
}

describe('clouds fixture: WAN profiles', function () {
  this.timeout(120_000)
  let topo: Topology | undefined
  const lines: string[] = []

  before(async function () {
    requireOrSkip(this, { root: true, commands: ['ip', 'nft', 'iptables', 'tc', 'gcc', 'iperf3', 'busybox'] })
    topo = await createClouds({
      clouds: [
        { name: 'a', profile: 'crosscloud', cc: 'cubic' },
        { name: 'b', profile: 'crosscloud' },
        { name: 'r', profile: 'region', cc: 'bbr' },
        { name: 'l', profile: LOSSY },
        { name: 'n' },
      ],
      internetHosts: ['x', 'mid'],
      internetHostProfiles: { x: 'crosscloud' },
      killGraceMs: 500,
      log: (l) => lines.push(l),
    })
  })

  after(async () => {
    await topo?.destroy()
  })

  it('measures at start what the profiles promise, and prints it', () => {
    const m = topo!.wan?.measured
    assert.ok(m !== undefined, 'no WAN measurement')
    process.stdout.write(`${lines.map((l) => `      ${l}`).join('\n')}\n`)
    // A ring over the profiled uplinks: a→b, b→r, r→l, l→x, x→a.
    assert.deepEqual(
      m.rtt.map((s) => `${s.from}→${s.to}`),
      ['a→b', 'b→r', 'r→l', 'l→x', 'x→a'],
    )
    const expect: Record<string, number> = { a: 30, b: 30, r: 2.5, l: 10, x: 30 }
    for (const s of m.rtt) {
      assert.equal(s.expectedMs, (expect[s.from]! + expect[s.to]!) / 2)
      assertRtt(`${s.from}→${s.to}`, s.rttMs, s.expectedMs)
    }
    assert.ok(lines.some((l) => /^wan: a→b RTT/.test(l)))
  })

  it("gives a path between NAT'd hosts its profile's RTT; the middle of the internet sits at half", async () => {
    const t = topo!
    const a1 = t.host('a1')
    // a1 → b's router crosses a's uplink and b's, both ways (the router answers pings on its public IP).
    assertRtt('a1 → b (crosscloud ↔ crosscloud)', await pingMs(a1, t.cloud('b').publicIp), 30)
    assertRtt('a1 → x (crosscloud ↔ internet host on crosscloud)', await pingMs(a1, t.host('x').ip), 30)
    assertRtt('a1 → mid (crosscloud ↔ the middle)', await pingMs(a1, t.host('mid').ip), 15)
    assertRtt('a1 → r (crosscloud ↔ region)', await pingMs(a1, t.cloud('r').publicIp), 16.25)
    // lan: no emulation at all.
    const lan = await pingMs(t.host('n1'), t.host('mid').ip)
    assert.ok(lan < 2, `lan RTT ${lan} ms`)
    assert.equal(t.cloud('n').profile.name, 'lan')
    assert.equal(t.cloud('a').profile, PROFILES.crosscloud)
  })

  it('drops at the loss rate without reordering, and caps the rate', async () => {
    const t = topo!
    const l1 = t.host('l1')
    const mid = t.host('mid')
    const before = (await t.wan!.stats()).find((s) => s.name === 'l')!
    // Half the rate: no queue drops, only the emulated loss. One uplink crossing to the middle.
    const slow = await udp(l1, mid, 40, 3, 5301)
    const after = (await t.wan!.stats()).find((s) => s.name === 'l')!
    const perCrossing = uplinkShape(LOSSY).loss * 100 // ≈ 1.005%
    process.stdout.write(
      `      lossy uplink at 40 Mbit/s: ${slow.packets} packets, ${slow.lostPct.toFixed(2)}% lost (expected ${perCrossing.toFixed(3)}%), ${slow.outOfOrder} out of order\n`,
    )
    assert.ok(slow.packets > 5000, `only ${slow.packets} packets`)
    // ~107 expected losses of ~10 700: ±40% is more than 4 standard deviations.
    assert.ok(
      slow.lostPct > perCrossing * 0.6 && slow.lostPct < perCrossing * 1.4,
      `loss ${slow.lostPct}% vs ${perCrossing}%`,
    )
    assert.equal(slow.outOfOrder, 0, 'jitter must never reorder')
    const lost = after.up.lost - before.up.lost
    assert.ok(lost > 0 && after.up.overflow === before.up.overflow, `emulator: lost ${lost}, overflow`)

    // Twice the rate: what arrives is capped at the profile's rate.
    const fast = await udp(l1, mid, 200, 2, 5302)
    process.stdout.write(
      `      lossy uplink driven at 200 Mbit/s: ${fast.mbit.toFixed(1)} Mbit/s arrive (cap 100)\n`,
    )
    assert.ok(fast.mbit <= 100 * 1.05, `rate ${fast.mbit} Mbit/s above the 100 Mbit/s cap`)
    assert.ok(fast.mbit >= 50, `rate ${fast.mbit} Mbit/s: far below the cap`)
    const cpu = t.wan!.cpuSeconds()
    assert.ok(cpu > 0, 'the emulator process must account for its CPU')
  })

  it("sets a cloud's default congestion control", async () => {
    const t = topo!
    assert.equal(t.cloud('a').cc, 'cubic')
    assert.equal(t.cloud('r').cc, 'bbr')
    const r = await t.host('a1').run('cat', ['/proc/sys/net/ipv4/tcp_congestion_control'])
    assert.equal(r.stdout.trim(), 'cubic')
    assert.notEqual(t.cloud('b').cc, '')
  })

  it('refuses an unknown profile; a lan-only topology runs no emulator; destroy() removes it', async () => {
    await assert.rejects(createClouds({ clouds: [{ name: 'q' }], profile: 'moon' as 'lan' }), {
      name: 'CloudsError',
    })
    const plain = await createClouds({ clouds: [{ name: 'q' }], killGraceMs: 300 })
    try {
      assert.equal(plain.wan, undefined)
    } finally {
      await plain.destroy()
    }
    const t = topo!
    const pid = t.wan!.emulator!.pid
    assert.ok(pid > 0)
    process.kill(pid, 0) // alive
    const prefix = t.prefix
    await t.destroy()
    assert.deepEqual(
      listNetns().filter((ns) => ns.startsWith(prefix)),
      [],
    )
    assert.throws(() => process.kill(pid, 0), { code: 'ESRCH' }, 'wanem survived destroy()')
    // The internet core address only ever lived in the topology's own namespace.
    assert.equal(INTERNET_CORE_IP, '198.51.100.1')
  })
})
