import assert from 'node:assert/strict'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  cgroupPathOf,
  createCgroupThrottle,
  MAX_LEVEL,
  parseMountinfo,
  quotaFor,
  THROTTLE_DIR,
} from '../../vm/throttle/cgroup.ts'
import {
  DEFAULT_POLICY,
  nextThrottleLevel,
  THROTTLE_LEVELS,
  ThrottleController,
} from '../../vm/throttle/controller.ts'
import type { CpuLimiter } from '../../vm/throttle/interfaces.ts'

const MB = 1e6
const MiB = 1024 * 1024

interface Trace {
  samples: { atMs: number; intervalMs: number; dirtyBytes: number; level: number }[]
}

describe('vCPU throttling', () => {
  describe('quota per level', () => {
    const rows: Array<[number, ReturnType<typeof quotaFor>]> = [
      [0, undefined],
      [-1, undefined],
      [0.2, { quotaUs: 80_000, periodUs: 100_000 }],
      [0.5, { quotaUs: 50_000, periodUs: 100_000 }],
      [0.99, { quotaUs: 1000, periodUs: 100_000 }],
      [0.995, { quotaUs: 1000, periodUs: 200_000 }],
      [0.999, { quotaUs: 1000, periodUs: 200_000 }],
    ]
    for (const [level, want] of rows)
      it(`${level} → ${JSON.stringify(want)}`, () => assert.deepEqual(quotaFor(level), want))
    it('never below the kernel minimum quota of 1 ms, never a period over 200 ms', () => {
      for (let l = 0.01; l < 1; l += 0.001) {
        const q = quotaFor(l)!
        assert.ok(
          q.quotaUs >= 1000 && q.periodUs <= 200_000 && q.quotaUs <= q.periodUs,
          `${l}: ${JSON.stringify(q)}`,
        )
      }
      assert.equal(MAX_LEVEL, 0.995)
    })
  })

  describe('finding the cpu controller', () => {
    it('parses a hybrid host (cpu on v1) and a pure v2 host', () => {
      const hybrid = [
        '30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755',
        '31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu',
        '32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct',
        '40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw',
      ].join('\n')
      assert.deepEqual(
        parseMountinfo(hybrid).map((m) => [m.kind, m.mount]),
        [
          ['cgroup1', '/sys/fs/cgroup/cpu'],
          ['cgroup2', '/sys/fs/cgroup/unified'],
        ],
      )
      const v2 = '29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot'
      assert.deepEqual(parseMountinfo(v2), [
        { kind: 'cgroup2', mount: '/sys/fs/cgroup', options: ['rw', 'nsdelegate', 'memory_recursiveprot'] },
      ])
      assert.deepEqual(
        parseMountinfo('50 1 0:40 / /tmp/a\\040b rw - cgroup cgroup rw,cpu,cpuacct')[0]?.mount,
        '/tmp/a b',
      )
    })
    it('reads a thread’s cgroup in either hierarchy', () => {
      const text = '12:cpu,cpuacct:/user.slice\n4:memory:/x\n0::/system.slice/mesh.service\n'
      assert.equal(cgroupPathOf(text, 'cgroup1'), '/user.slice')
      assert.equal(cgroupPathOf(text, 'cgroup2'), '/system.slice/mesh.service')
      assert.equal(cgroupPathOf('3:memory:/a\n', 'cgroup1'), undefined)
    })
  })

  describe('policy', () => {
    const base = { level: 0, dirtyBytesPerSec: 64 * MiB, linkBytesPerSec: 12 * MB, sinceChangeMs: 2000 }
    const rows: Array<[string, Partial<typeof base>, number]> = [
      ['outruns the link 5× → two steps', {}, 0.5],
      ['outruns it 2× → one step', { dirtyBytesPerSec: 24 * MB }, 0.2],
      ['below half the link → unchanged', { dirtyBytesPerSec: 5 * MB }, 0],
      ['just above half → one step', { level: 0.9, dirtyBytesPerSec: 6.5 * MB }, 0.95],
      ['too soon after a change → unchanged', { sinceChangeMs: 500 }, 0],
      ['at the top → stays', { level: 0.995 }, 0.995],
      ['no link rate yet → unchanged', { linkBytesPerSec: 0 }, 0],
      ['between steps → the next one up', { level: 0.85, dirtyBytesPerSec: 10 * MB }, 0.9],
    ]
    for (const [what, over, want] of rows)
      it(what, () => assert.equal(nextThrottleLevel({ ...base, ...over }), want))
    it('never steps down, never past the policy’s maximum', () => {
      for (const level of THROTTLE_LEVELS)
        for (const d of [0, 1 * MB, 10 * MB, 1000 * MB]) {
          const n = nextThrottleLevel(
            { ...base, level, dirtyBytesPerSec: d },
            { ...DEFAULT_POLICY, maxLevel: 0.98 },
          )
          assert.ok(n >= Math.min(level, 0.98) && n <= Math.max(level, 0.98), `${level}, ${d} → ${n}`)
        }
    })
  })

  describe('controller on the recorded throttle trace (real guest, cgroup on its vCPU)', () => {
    const t = JSON.parse(
      readFileSync(join(import.meta.dirname, 'traces', 'throttle-hot.json'), 'utf8'),
    ) as Trace
    /** The guest's dirty rate at a level, as recorded (mean over that level's samples). */
    const plant = (level: number): number => {
      const s = t.samples.filter((x) => x.level === level)
      return (s.reduce((a, x) => a + x.dirtyBytes, 0) * 1000) / s.reduce((a, x) => a + x.intervalMs, 0)
    }
    it('the recording shows the non-linear response the steps are built for', () => {
      assert.ok(plant(0) > 50 * MiB, `unthrottled ${plant(0) / MiB} MiB/s`)
      assert.ok(plant(0.8) > 0.6 * plant(0), 'a fifth of a CPU still dirties most of it')
      assert.ok(plant(0.995) < 0.5 * plant(0), `deepest ${plant(0.995) / MiB} MiB/s`)
    })
    it('steps up until the guest dirties less than half the link, then holds', async () => {
      let now = 0
      let level = 0
      const limiter: CpuLimiter = {
        backend: 'fake',
        vcpuOnly: true,
        get level() {
          return level
        },
        async set(l) {
          level = l
        },
        async lift() {
          level = 0
        },
      }
      const c = new ThrottleController(limiter, () => now)
      const link = 2 * plant(0.995) + MB
      for (let round = 0; round < 20; round++) {
        now += 1500
        await c.observe(plant(c.level), link)
      }
      assert.ok(
        plant(c.level) <= 0.5 * link,
        `settled at ${c.level}: ${plant(c.level) / MiB} MiB/s over ${link / MB} MB/s`,
      )
      const levels = c.steps.map((s) => s.level)
      assert.deepEqual(
        [...levels].sort((a, b) => a - b),
        levels,
        'only up',
      )
      assert.ok(levels.length <= THROTTLE_LEVELS.length - 1)
      await c.lift()
      assert.equal(limiter.level, 0)
      assert.equal(await c.observe(100 * MB, 1), 0, 'lifted: no more steps')
    })
  })

  describe('cgroup limiter against a fake cgroupfs', () => {
    let root: string
    beforeEach(() => {
      root = mkdtempSync(join(tmpdir(), 'mesh-fake-cgroup-'))
    })
    afterEach(() => rmSync(root, { recursive: true, force: true }))
    const read = (...p: string[]) => readFileSync(join(root, ...p), 'utf8')

    it('v1: the threads move into our cgroup, quota and period follow the level, lift restores', async () => {
      const p = createCgroupThrottle({ hierarchy: { kind: 'cgroup1', mount: root } })
      assert.deepEqual(await p.available(), { ok: true, backend: 'cgroup1' })
      const l = await p.forProcess(process.pid, 'g1')
      const dir = [THROTTLE_DIR, `g1-${process.pid}`]
      await l.set(0.5)
      assert.equal(read(...dir, 'cpu.cfs_period_us'), '100000')
      assert.equal(read(...dir, 'cpu.cfs_quota_us'), '50000')
      assert.match(read(...dir, 'tasks'), /^\d+$/)
      await l.set(0.995)
      assert.equal(read(...dir, 'cpu.cfs_period_us'), '200000')
      assert.equal(read(...dir, 'cpu.cfs_quota_us'), '1000')
      assert.equal(l.level, 0.995)
      await l.lift()
      assert.equal(read(...dir, 'cpu.cfs_quota_us'), '-1')
      assert.equal(l.level, 0)
      await assert.rejects(l.set(0.5), { name: 'ThrottleError' })
    })
    it('v2: the process moves, the controller is enabled on the way, cpu.max carries the limit', async () => {
      const p = createCgroupThrottle({ hierarchy: { kind: 'cgroup2', mount: root } })
      const l = await p.forProcess(process.pid, 'g/1')
      const dir = [THROTTLE_DIR, `g_1-${process.pid}`]
      await l.set(0.9)
      assert.equal(read('cgroup.subtree_control'), '+cpu')
      assert.equal(read(THROTTLE_DIR, 'cgroup.subtree_control'), '+cpu')
      assert.equal(read(...dir, 'cgroup.procs'), String(process.pid))
      // node's threads are not named 'CPU n/…': the whole process is limited.
      assert.equal(l.vcpuOnly, false)
      assert.equal(read(...dir, 'cpu.max'), '10000 100000')
      await l.set(0)
      assert.equal(read(...dir, 'cpu.max'), 'max 100000')
      await l.lift()
      assert.equal(read('cgroup.procs'), String(process.pid), 'back to where it was (the root here)')
    })
  })
})
