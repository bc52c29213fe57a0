import assert from 'node:assert/strict'
import {
  isNoop,
  PROFILE_NAMES,
  PROFILES,
  profileFromEnv,
  resolveProfile,
  uplinkShape,
} from '../../fixtures/wan/profiles.ts'

describe('WAN profiles', () => {
  it('has the four profiles of issue 13', () => {
    assert.deepEqual(PROFILE_NAMES, ['lan', 'region', 'crosscloud', 'intercontinental'])
    assert.equal(PROFILES.crosscloud.rttMs, 30)
    assert.equal(PROFILES.crosscloud.rateMbit, 1000)
    assert.equal(PROFILES.crosscloud.lossPct, 0.05)
    assert.equal(PROFILES.intercontinental.rttMs, 120)
    assert.equal(PROFILES.intercontinental.rateMbit, 300)
    assert.equal(PROFILES.intercontinental.lossPct, 0.2)
    assert.ok(PROFILES.region.rttMs >= 2 && PROFILES.region.rttMs <= 3)
    assert.equal(isNoop(PROFILES.lan), true)
    assert.equal(isNoop(PROFILES.region), false)
  })

  it('splits a path across two uplinks: RTT/4 per crossing, loss composing to the path loss', () => {
    const s = uplinkShape(PROFILES.crosscloud)
    assert.equal(s.delayUs, 7500) // four crossings per round trip
    // Two crossings per direction lose p in all: 1 - (1 - l)^2 = p.
    assert.ok(Math.abs(1 - (1 - s.loss) ** 2 - 0.0005) < 1e-12)
    // Two crossings' jitter adds up (variances) to the path's.
    assert.ok(Math.abs(Math.sqrt(2 * s.jitterUs ** 2) - 500) < 1)
    assert.equal(s.rateBit, 1e9)
    // The queue holds the path's bandwidth-delay product: 1 Gbit/s × 30 ms.
    assert.equal(s.queueBytes, 3_750_000)
    assert.ok(s.burstBytes >= 16 * 1024)
    assert.equal(uplinkShape(PROFILES.lan).rateBit, 0)
  })

  it('refuses unknown names and impossible custom profiles', () => {
    assert.throws(() => resolveProfile('moon'), { name: 'WanProfileError', message: /crosscloud/ })
    assert.throws(() => resolveProfile({ name: 'x', rttMs: -1, rateMbit: 1, lossPct: 0, jitterMs: 0 }), {
      name: 'WanProfileError',
    })
    assert.throws(() => resolveProfile({ name: 'x', rttMs: 1, rateMbit: 1, lossPct: 100, jitterMs: 0 }), {
      name: 'WanProfileError',
    })
    const custom = { name: 'x', rttMs: 10, rateMbit: 100, lossPct: 1, jitterMs: 1 }
    assert.equal(resolveProfile(custom), custom)
  })

  it('takes the profile of tests and benches from MESH_TEST_PROFILE', () => {
    assert.equal(profileFromEnv('lan', {}), 'lan')
    assert.equal(profileFromEnv('lan', { MESH_TEST_PROFILE: 'crosscloud' }), 'crosscloud')
    assert.equal(profileFromEnv('region', { MESH_TEST_PROFILE: ' ' }), 'region')
    assert.throws(() => profileFromEnv('lan', { MESH_TEST_PROFILE: 'nope' }), { name: 'WanProfileError' })
  })
})
