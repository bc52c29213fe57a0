import assert from 'node:assert/strict'
import fc from 'fast-check'
import {
  type Candidate,
  type PlacementInput,
  type PlacementVm,
  place,
} from '../../src/agent/spot/placement.ts'

const vm = (name: string, memoryMiB: number, o: Partial<PlacementVm> = {}): PlacementVm => ({
  name,
  memoryMiB,
  vcpus: 1,
  diskBytes: 0,
  priority: 0,
  ...o,
})
const member = (name: string, ramMiB: number, o: Partial<Candidate> = {}): Candidate => ({
  peer: `P-${name}`,
  name,
  labels: {},
  free: { ramMiB, diskBytes: 100 * 2 ** 30, vcpus: 8 },
  draining: false,
  underNotice: false,
  standbys: [],
  ...o,
})
const self = { peer: 'P-self', labels: { provider: 'gcp' } }

/** Each row: the input and where each VM must go ('-' = unplaced, with a reason matching the regex). */
const table: { what: string; input: PlacementInput; expect: Record<string, string | RegExp> }[] = [
  {
    what: 'another provider beats a faster link at the same provider',
    input: {
      self,
      vms: [vm('g1', 256)],
      candidates: [
        member('same', 4096, { labels: { provider: 'gcp' }, rttMs: 1 }),
        member('other', 4096, { labels: { provider: 'aws' }, rttMs: 40 }),
      ],
    },
    expect: { g1: 'other' },
  },
  {
    what: 'the standby holder beats every other preference',
    input: {
      self,
      vms: [vm('g1', 256)],
      candidates: [
        member('cheap', 4096, { labels: { provider: 'aws', price: '0.001' }, rttMs: 1 }),
        member('standby', 4096, { labels: { provider: 'gcp', price: '9' }, rttMs: 120, standbys: ['g1'] }),
      ],
    },
    expect: { g1: 'standby' },
  },
  {
    what: "a standby's member keeps its room for that VM, even when an earlier VM would like it best",
    input: {
      self,
      vms: [vm('g1', 256), vm('g2', 256)],
      candidates: [
        member('cheap', 300, { labels: { provider: 'aws', price: '0.01' }, standbys: ['g2'] }),
        member('dear', 4096, { labels: { provider: 'azure', price: '0.05' } }),
      ],
    },
    expect: { g1: 'dear', g2: 'cheap' },
  },
  {
    what: 'a better link class beats a cheaper price; within a class the cheaper price wins',
    input: {
      self,
      vms: [vm('g1', 256), vm('g2', 256)],
      candidates: [
        member('far-cheap', 256, { labels: { provider: 'aws', price: '0.01' }, rttMs: 200 }),
        member('near-dear', 256, { labels: { provider: 'aws', price: '0.05' }, rttMs: 30 }),
        member('near-cheap', 256, { labels: { provider: 'azure', price: '0.02' }, rttMs: 45 }),
      ],
    },
    // Both near members are in the ≤ 50 ms class: the cheaper first, then the other near one.
    expect: { g1: 'near-cheap', g2: 'near-dear' },
  },
  {
    what: 'a relayed link drops one class',
    input: {
      self,
      vms: [vm('g1', 256)],
      candidates: [
        member('relayed', 4096, { labels: { provider: 'aws' }, rttMs: 5, relayed: true }),
        member('direct', 4096, { labels: { provider: 'aws' }, rttMs: 9 }),
      ],
    },
    expect: { g1: 'direct' },
  },
  {
    what: 'never overcommits: the second VM goes elsewhere when the first filled the best member',
    input: {
      self,
      vms: [vm('g1', 512), vm('g2', 512)],
      candidates: [
        member('best', 768, { labels: { provider: 'aws', price: '0.01' }, rttMs: 5 }),
        member('next', 768, { labels: { provider: 'aws', price: '0.02' }, rttMs: 5 }),
      ],
    },
    expect: { g1: 'best', g2: 'next' },
  },
  {
    what: 'priority decides who gets the only room; the other is reported at once with the shortfall',
    input: {
      self,
      vms: [vm('big-low', 512, { priority: 0 }), vm('small-high', 256, { priority: 10 })],
      candidates: [member('only', 600, { labels: { provider: 'aws' } })],
    },
    expect: {
      'small-high': 'only',
      'big-low': /no member has room: needs 512 MiB RAM.*only 344 MiB RAM free/,
    },
  },
  {
    what: 'vCPUs count too',
    input: {
      self,
      vms: [vm('g1', 256, { vcpus: 4 })],
      candidates: [member('few', 4096, { free: { ramMiB: 4096, diskBytes: 2 ** 40, vcpus: 2 } })],
    },
    expect: { g1: /2 vCPU free/ },
  },
  {
    what: 'draining members, members under notice and this host are never destinations',
    input: {
      self,
      vms: [vm('g1', 256)],
      candidates: [
        member('drain', 4096, { draining: true }),
        member('doomed', 4096, { underNotice: true }),
        { ...member('me', 4096), peer: 'P-self' },
      ],
    },
    expect: { g1: /no member has room.*drain draining.*doomed under a notice/ },
  },
  {
    what: 'no other member at all',
    input: { self, vms: [vm('g1', 256)], candidates: [] },
    expect: { g1: /no member to move to/ },
  },
  {
    what: '--to: only that member, even when another is better',
    input: {
      self,
      to: 'P-chosen',
      vms: [vm('g1', 256), vm('g2', 256)],
      candidates: [
        member('chosen', 300, { labels: { provider: 'gcp' } }),
        member('better', 4096, { labels: { provider: 'aws' } }),
      ],
    },
    expect: { g1: 'chosen', g2: /chosen 44 MiB RAM free/ },
  },
]

describe('spot placement (pure)', () => {
  for (const row of table) {
    it(row.what, () => {
      const p = place(row.input)
      const got = new Map<string, string>()
      for (const a of p.assignments) got.set(a.vm, a.toName)
      for (const u of p.unplaced) got.set(u.vm, `- ${u.reason}`)
      for (const [name, want] of Object.entries(row.expect)) {
        const g = got.get(name)
        assert.ok(g !== undefined, `${name} is neither placed nor unplaced`)
        if (typeof want === 'string') assert.equal(g, want, `${name}: ${g}`)
        else assert.match(g, want, `${name}: ${g}`)
      }
      assert.equal(got.size, row.input.vms.length)
    })
  }

  it('assignments come in priority order', () => {
    const p = place({
      self,
      vms: [vm('a', 256, { priority: 1 }), vm('b', 256, { priority: 5 }), vm('c', 1024, { priority: 1 })],
      candidates: [member('m', 8192)],
    })
    assert.deepEqual(
      p.assignments.map((a) => a.vm),
      ['b', 'c', 'a'],
    )
  })

  it('property: never overcommits, places each VM once, never on a draining/doomed member or itself', () => {
    const arbVm = fc.record({
      name: fc.stringMatching(/^[a-z]{1,6}$/),
      memoryMiB: fc.integer({ min: 16, max: 4096 }),
      vcpus: fc.integer({ min: 1, max: 8 }),
      diskBytes: fc.integer({ min: 0, max: 2 ** 34 }),
      priority: fc.integer({ min: -5, max: 5 }),
    })
    const arbMember = fc.record({
      peer: fc.stringMatching(/^P-[a-z]{1,4}$/),
      name: fc.stringMatching(/^[a-z]{1,4}$/),
      labels: fc.record(
        { provider: fc.constantFrom('aws', 'gcp', 'azure'), price: fc.constantFrom('0.01', '0.1', 'x') },
        { requiredKeys: [] },
      ),
      free: fc.record({
        ramMiB: fc.integer({ min: 0, max: 8192 }),
        diskBytes: fc.integer({ min: 0, max: 2 ** 35 }),
        vcpus: fc.integer({ min: 0, max: 16 }),
      }),
      draining: fc.boolean(),
      underNotice: fc.boolean(),
      rttMs: fc.option(fc.double({ min: 0, max: 300, noNaN: true }), { nil: undefined }),
      relayed: fc.boolean(),
      standbys: fc.array(fc.stringMatching(/^[a-z]{1,6}$/), { maxLength: 3 }),
    })
    fc.assert(
      fc.property(
        fc.uniqueArray(arbVm, { selector: (v) => v.name, maxLength: 12 }),
        fc.uniqueArray(arbMember, { selector: (m) => m.peer, maxLength: 6 }),
        (vms, members) => {
          const p = place({ self: { peer: 'P-self', labels: { provider: 'gcp' } }, vms, candidates: members })
          assert.equal(p.assignments.length + p.unplaced.length, vms.length)
          assert.equal(new Set([...p.assignments, ...p.unplaced].map((x) => x.vm)).size, vms.length)
          const byMember = new Map<string, PlacementVm[]>()
          for (const a of p.assignments) {
            const m = members.find((c) => c.peer === a.to)!
            assert.ok(!m.draining && !m.underNotice && m.peer !== 'P-self')
            byMember.set(a.to, [...(byMember.get(a.to) ?? []), vms.find((v) => v.name === a.vm)!])
          }
          for (const [peer, list] of byMember) {
            const m = members.find((c) => c.peer === peer)!
            assert.ok(list.reduce((n, v) => n + v.memoryMiB, 0) <= m.free.ramMiB)
            assert.ok(list.reduce((n, v) => n + v.vcpus, 0) <= m.free.vcpus)
            assert.ok(list.reduce((n, v) => n + v.diskBytes, 0) <= m.free.diskBytes)
          }
        },
      ),
      { numRuns: 500 },
    )
  })
})
