import assert from 'node:assert/strict'
import type { MemberStatus } from '../../net/interfaces.ts'
import { createAgentMetrics, parseListenAddr } from '../../src/agent/metrics.ts'
import { UsageError } from '../../src/base/errors.ts'
import { createLogger } from '../../src/base/log.ts'
import type { MigrationReport } from '../../vm/migration/interfaces.ts'

const quiet = createLogger({ sink: () => {} })
const member = (o: Partial<MemberStatus>): MemberStatus =>
  ({
    peerId: 'p',
    name: 'n',
    self: false,
    state: 'up',
    link: 'open',
    addedBy: 'x',
    addedAt: 0,
    ...o,
  }) as MemberStatus

describe('agent metrics (prom-client registry)', () => {
  const sources = {
    members: () => [
      member({ peerId: 'me', name: 'a', self: true, link: 'none' }),
      member({ peerId: 'pb', name: 'b', path: 'srflx', rttMs: 12.5 }),
      member({ peerId: 'pc', name: 'c', path: 'host', direct: '/ip4/1.2.3.4/tcp/1', rttMs: 2 }),
    ],
    tunnel: () => ({
      ports: [
        {
          id: 'pb',
          kind: 'remote' as const,
          detail: 'pb',
          rxFrames: 3,
          rxBytes: 300,
          txFrames: 4,
          txBytes: 400,
          drops: 1,
        },
        { id: 'vm:g1', kind: 'vm' as const, rxFrames: 5, rxBytes: 500, txFrames: 6, txBytes: 600, drops: 0 },
      ],
      macs: 1,
      movedAway: 0,
      held: 0,
      heldTotal: 0,
      announcesPending: 0,
      drops: { oversize: 2 },
      mtu: 1184,
    }),
    chunks: () => ({ wireBytesIn: 1000, wireBytesOut: 50, rejectedBlocks: 0 }),
    vms: async () => [{ status: 'running' }, { status: 'running' }, { status: 'exited' }],
  }

  it('reads links, tunnel, chunks and VMs at scrape time, in base units', async () => {
    const m = createAgentMetrics({ listen: '127.0.0.1:0', sources, log: quiet })
    const text = await m.registry.metrics()
    assert.match(text, /mesh_link_rtt_seconds\{peer="pb",name="b",path="srflx"\} 0\.0125/)
    assert.match(text, /mesh_link_rtt_seconds\{peer="pc",name="c",path="host\+direct"\} 0\.002/)
    assert.match(text, /mesh_links\{path="srflx"\} 1/)
    assert.match(text, /mesh_members\{state="self"\} 1/)
    assert.match(text, /mesh_tunnel_bytes_total\{path="srflx",direction="tx"\} 400/)
    assert.match(text, /mesh_tunnel_frames_total\{kind="vm",direction="rx"\} 5/)
    assert.match(text, /mesh_tunnel_drops_total\{reason="oversize"\} 2/)
    assert.match(text, /mesh_tunnel_drops_total\{reason="port_remote"\} 1/)
    assert.match(text, /mesh_chunk_fetch_bytes_total\{direction="in"\} 1000/)
    assert.match(text, /mesh_vms\{state="running"\} 2/)
    assert.match(text, /mesh_vms\{state="paused"\} 0/)
    // Scraping twice does not double counters read from cumulative totals.
    assert.match(await m.registry.metrics(), /mesh_chunk_fetch_bytes_total\{direction="in"\} 1000/)
  })

  it('turns session state changes into phase durations and outcomes, reports into downtime and bytes', async () => {
    const m = createAgentMetrics({ listen: '127.0.0.1:0', sources, log: quiet })
    const ev = (from: string, to: string, atMs: number) =>
      m.observeState({ vm: 'g1', direction: 'out', peer: 'pb', from, to, atMs })
    ev('setup', 'bulk', 1000)
    ev('bulk', 'precopy', 3000)
    ev('precopy', 'switching', 3500)
    ev('switching', 'paused', 3510)
    ev('paused', 'committed', 3580)
    ev('committed', 'handover', 3600)
    ev('handover', 'completed', 3700)
    m.observeReport({ downtimeMs: 80, wireBytes: 30e6, to: 'pb' } as MigrationReport, 'srflx')
    const text = await m.registry.metrics()
    assert.match(text, /mesh_migration_duration_seconds_sum\{direction="out",phase="bulk"\} 2\n/)
    assert.match(text, /mesh_migration_duration_seconds_sum\{direction="out",phase="paused"\} 0\.07\n/)
    assert.match(text, /mesh_migration_duration_seconds_sum\{direction="out",phase="total"\} 2\.7\n/)
    assert.match(text, /mesh_migration_duration_seconds_bucket\{le="0\.1",direction="out",phase="paused"\} 1/)
    assert.match(text, /mesh_migrations_total\{direction="out",outcome="completed"\} 1/)
    assert.match(text, /mesh_migration_downtime_seconds_sum 0\.08/)
    assert.match(text, /mesh_migration_bytes_total\{path="srflx"\} 30000000/)
  })

  it('takes IP:PORT only', () => {
    assert.deepEqual(parseListenAddr('127.0.0.1:9464', '--metrics'), { host: '127.0.0.1', port: 9464 })
    assert.deepEqual(parseListenAddr('[::1]:80', '--metrics'), { host: '::1', port: 80 })
    for (const bad of ['9464', 'example.com:80', '1.2.3.4:70000', '1.2.3.4:'])
      assert.throws(() => parseListenAddr(bad, '--metrics'), UsageError)
  })

  it('serves /metrics over HTTP and stops', async () => {
    const m = createAgentMetrics({ listen: '127.0.0.1:0', sources, log: quiet })
    await m.start(new AbortController().signal)
    try {
      const res = await fetch(`http://${m.address()}/metrics`)
      assert.equal(res.status, 200)
      assert.match(res.headers.get('content-type') ?? '', /text\/plain/)
      assert.match(await res.text(), /mesh_vms/)
    } finally {
      await m.stop()
    }
  })
})
