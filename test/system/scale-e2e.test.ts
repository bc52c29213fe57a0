/**
 * The reduced form of `npm run bench -- scale` (issue 19, "Scale"): 12 `mesh` agents in three NAT'd
 * clouds plus a bootstrap, all joined at once, with `--warm-links 2` so that most member pairs have no
 * standing link and every sampled ping needs a link built on demand. Asserts what an operator judges
 * a fleet by: everyone joined and reachable within 60 s, links bounded by the warm set plus what was
 * asked for (not a full mesh), and each agent's own memory (PSS) within 100 MB. RSS (which also counts
 * the node binary's pages, shared by every agent: ~35-50 MB) and idle CPU are reported here and judged
 * by the bench against the targets (a loaded CI box makes a 1 % bound a coin toss); a leak
 * (RSS > 160 MB) or a runaway loop (> 10 %) still fails.
 */
import assert from 'node:assert/strict'
import { median, runScale } from '../helpers/scale-rig.ts'

describe("scale: 12 agents in 3 NAT'd clouds, links on demand (reduced bench scale)", function () {
  this.timeout(400_000)

  it('all join and reach each other within 60 s, each ≤ 100 MB PSS, links bounded by the warm set', async () => {
    const pings = 2
    const warm = 2
    // warm neighbours + links this member asked for + links asked of it (the late member pings nobody)
    // +1: the late member's arrival shifts one ring neighbour (the old link idles out after 120 s);
    // +1: the bootstrap keeps its default 8 neighbours, so it may hold a link to this member too.
    const bound = warm + 2 * pings + 2
    const r = await runScale({
      agents: 12,
      hostsPerCloud: 4,
      settleS: 3,
      idleS: 10,
      pingsPerMember: pings,
      reachTimeoutMs: 60_000,
      agentArgs: ['--warm-links', String(warm)],
      // A join storm on a slow or loaded box shifts a member's ring neighbours more than once while the
      // member set fills in (9 open once at load 17-28): those links close after the supervisor's 120 s
      // link idle time, so a member above the bound is sampled again until then. A leak or a full mesh
      // does not close and still fails below.
      linksSettle: { bound, withinMs: 135_000 },
      log: (l) => process.stderr.write(`[scale-e2e] ${l}\n`),
    })
    process.stderr.write(
      `[scale-e2e] ${JSON.stringify({ joinMs: r.joinMs, reachMs: r.reachMs, pings: r.pings, rssMB: r.rssMB, pssMB: r.pssMB, cpuPct: r.cpuPct, linksOpen: r.linksOpen, linksOpenIdle: r.linksOpenIdle, linksSettledMs: r.linksSettledMs, boot: r.boot, gossip: r.gossip, load1: r.load1 })}\n`,
    )
    assert.ok(r.joinAllMs <= 60_000, `joined and reachable after ${r.joinAllMs} ms`)
    assert.equal(r.pings.ok, 12 * pings, 'every planned ping answered')
    // Measured 40-80 MB PSS (RSS 85-126) with 2-7 links on werift: the 80 MB RSS is the bench's
    // verdict; this bound catches a leak or a full mesh sneaking back.
    assert.ok(Math.max(...r.pssMB) <= 100, `PSS per agent ${r.pssMB.join(', ')} MB`)
    assert.ok(Math.max(...r.rssMB) <= 160, `RSS per agent ${r.rssMB.join(', ')} MB`)
    assert.ok(
      Math.max(...r.linksOpen) <= bound,
      `links open ${r.linksOpen.join(', ')} (bound ${bound}; at the idle sample ${r.linksOpenIdle.join(', ')}, then ${r.linksSettledMs} ms)`,
    )
    assert.ok(Math.max(...r.linksOpen) < 12, 'not a full mesh')
    assert.ok(median(r.cpuPct) <= 10, `idle CPU ${r.cpuPct.join(', ')} %`)
    // Member-set gossip sends differences, not sets: one more member joining the 13 cost 3.1-3.4 MB
    // mesh-wide with whole-set push-pull, ~0.1 MB with digests and deltas (/mesh/members/2).
    const oneMore = r.gossip.oneMore.bytesOut
    assert.ok(oneMore <= 1_000_000, `one more member's gossip: ${oneMore} bytes`)
  })
})
