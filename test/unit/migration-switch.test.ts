import assert from 'node:assert/strict'
import {
  DESTINATION_TRANSITIONS,
  type DestinationState,
  SOURCE_TRANSITIONS,
  type SourceState,
  StateMachine,
  sourceFailureOutcome,
} from '../../vm/migration/state.ts'
import { DEFAULT_RATE_GUESS, decideSwitch, type SwitchInput } from '../../vm/migration/switch-decision.ts'

const MiB = 1024 * 1024

describe('migration switch decision (pure, table)', () => {
  const base: SwitchInput = {
    round: 0,
    pendingBytes: 8 * MiB,
    scanMs: 50,
    sendRateBytesPerSec: 0,
    nowMs: 1000,
    switchBytes: MiB,
    maxRounds: 8,
  }
  const rows: Array<[string, Partial<SwitchInput>, string]> = [
    ['small dirty set → switch', { pendingBytes: MiB }, 'switch:small'],
    ['nothing dirty → switch', { pendingBytes: 0 }, 'switch:small'],
    ['large, first decision → another round', {}, 'round'],
    ['first decision ignores prevPendingBytes', { prevPendingBytes: 8 * MiB }, 'round'],
    ['shrinking by >10% → another round', { round: 1, prevPendingBytes: 10 * MiB }, 'round'],
    ['shrinking by <10% → not-shrinking', { round: 1, prevPendingBytes: 8.5 * MiB }, 'switch:not-shrinking'],
    ['growing → not-shrinking', { round: 2, prevPendingBytes: 4 * MiB }, 'switch:not-shrinking'],
    [
      'small wins over not-shrinking',
      { round: 3, pendingBytes: MiB / 2, prevPendingBytes: MiB / 2 },
      'switch:small',
    ],
    ['rounds used up → max-rounds', { round: 8, prevPendingBytes: 100 * MiB }, 'switch:max-rounds'],
    ['one round short of the cap → round', { round: 7, prevPendingBytes: 100 * MiB }, 'round'],
    ['deadline far → round', { deadline: { atMs: 1000 + 60_000, ms: 60_000 } }, 'round'],
    [
      // 8 MiB at the default 50 MiB/s: 160 ms + 50 ms scan for a round, 1160 ms for the switch; the
      // margin is 20% of 2 s = 400 ms: 1000 + 1370 > 1000 + 2000 - 400 is false → 1370 < 1600: round.
      'deadline just feasible at the guessed rate → round',
      { deadline: { atMs: 1000 + 2000, ms: 2000 } },
      'round',
    ],
    [
      'deadline too close at the guessed rate → deadline',
      { deadline: { atMs: 1000 + 1500, ms: 1500 } },
      'switch:deadline',
    ],
    [
      'measured slow rate makes the deadline too close',
      { sendRateBytesPerSec: 2 * MiB, deadline: { atMs: 1000 + 8000, ms: 10_000 } },
      'switch:deadline',
    ],
    [
      'measured fast rate keeps it feasible',
      { sendRateBytesPerSec: 200 * MiB, deadline: { atMs: 1000 + 8000, ms: 10_000 } },
      'round',
    ],
    [
      'deadline already passed → deadline',
      { nowMs: 50_000, deadline: { atMs: 40_000, ms: 30_000 } },
      'switch:deadline',
    ],
    // With a bound on the pause (#15).
    [
      'pause bound, the rest fits it → switch',
      { maxPauseMs: 1000, predictedPauseMs: 600 },
      'switch:fits-pause',
    ],
    [
      'pause bound, pre-copy cannot converge, post-copy allowed → postcopy',
      { maxPauseMs: 1000, predictedPauseMs: 9000, postcopy: 'allowed', precopyConverges: false },
      'postcopy:dirty-rate',
    ],
    [
      'pause bound, converging, post-copy allowed → another round',
      { maxPauseMs: 1000, predictedPauseMs: 9000, postcopy: 'allowed', precopyConverges: true },
      'round',
    ],
    [
      'pause bound, not shrinking, post-copy allowed → postcopy',
      { round: 2, prevPendingBytes: 8 * MiB, maxPauseMs: 1000, postcopy: 'allowed', precopyConverges: true },
      'postcopy:not-shrinking',
    ],
    [
      'pause bound, no post-copy, not shrinking but the throttle can go up → round',
      { round: 2, prevPendingBytes: 8 * MiB, maxPauseMs: 1000, postcopy: 'no', throttleHeadroom: true },
      'round',
    ],
    [
      'no post-copy, throttle exhausted, not shrinking → switch (the pause may exceed the bound)',
      { round: 2, prevPendingBytes: 8 * MiB, maxPauseMs: 1000, postcopy: 'no', throttleHeadroom: false },
      'switch:not-shrinking',
    ],
    [
      'no bound: post-copy is never chosen by itself',
      { round: 2, prevPendingBytes: 8 * MiB, postcopy: 'allowed', precopyConverges: false },
      'switch:not-shrinking',
    ],
    ['post-copy asked for → at the first decision', { postcopy: 'requested' }, 'postcopy:requested'],
    [
      'post-copy asked for, but nothing left → plain switch',
      { postcopy: 'requested', pendingBytes: 0 },
      'switch:small',
    ],
    // Best effort under a deadline (an evacuation): post-copy at once rather than one more round.
    [
      'best effort, deadline, converging, post-copy allowed → postcopy at the first decision',
      {
        bestEffort: true,
        deadline: { atMs: 1000 + 60_000, ms: 60_000 },
        maxPauseMs: 1000,
        predictedPauseMs: 9000,
        postcopy: 'allowed',
        precopyConverges: true,
      },
      'postcopy:best-effort',
    ],
    [
      'best effort, deadline, the rest fits the pause → plain switch',
      {
        bestEffort: true,
        deadline: { atMs: 1000 + 60_000, ms: 60_000 },
        maxPauseMs: 1000,
        predictedPauseMs: 600,
        postcopy: 'allowed',
      },
      'switch:fits-pause',
    ],
    [
      'best effort, deadline, the destination cannot page → another round (throttle, pre-copy)',
      {
        bestEffort: true,
        deadline: { atMs: 1000 + 60_000, ms: 60_000 },
        maxPauseMs: 1000,
        predictedPauseMs: 9000,
        postcopy: 'no',
        precopyConverges: true,
      },
      'round',
    ],
    [
      'best effort without a deadline changes nothing',
      {
        bestEffort: true,
        maxPauseMs: 1000,
        predictedPauseMs: 9000,
        postcopy: 'allowed',
        precopyConverges: true,
      },
      'round',
    ],
    [
      'best effort, pre-copy cannot converge → postcopy says why (dirty-rate)',
      {
        bestEffort: true,
        deadline: { atMs: 1000 + 60_000, ms: 60_000 },
        maxPauseMs: 1000,
        predictedPauseMs: 9000,
        postcopy: 'allowed',
        precopyConverges: false,
      },
      'postcopy:dirty-rate',
    ],
    [
      'pause bound, rounds used up, post-copy allowed → postcopy',
      { round: 8, prevPendingBytes: 100 * MiB, maxPauseMs: 1000, postcopy: 'allowed' },
      'postcopy:max-rounds',
    ],
  ]
  for (const [what, over, expect] of rows) {
    it(what, () => {
      const d = decideSwitch({ ...base, ...over })
      assert.equal(d.action === 'round' ? d.action : `${d.action}:${d.reason}`, expect)
    })
  }

  it('the deadline arithmetic at the edge (default rate guess)', () => {
    const pending = 5 * MiB
    const roundMs = (pending * 1000) / DEFAULT_RATE_GUESS + 50
    const switchMs = 1000 + (pending * 1000) / DEFAULT_RATE_GUESS
    const ms = 10_000
    // now + round + switch == at - 20%: not more than, so another round.
    const atMs = 1000 + roundMs + switchMs + ms * 0.2
    assert.equal(decideSwitch({ ...base, pendingBytes: pending, deadline: { atMs, ms } }).action, 'round')
    assert.equal(
      decideSwitch({ ...base, pendingBytes: pending, deadline: { atMs: atMs - 1, ms } }).action,
      'switch',
    )
  })
})

describe('migration state machines (tables)', () => {
  const reachable = <S extends string>(table: Record<S, readonly S[]>, from: S): Set<S> => {
    const seen = new Set<S>([from])
    const todo = [from]
    while (todo.length > 0)
      for (const n of table[todo.pop()!])
        if (!seen.has(n)) {
          seen.add(n)
          todo.push(n)
        }
    return seen
  }

  it('every source state is reachable from setup, and every non-terminal one can end', () => {
    const states = Object.keys(SOURCE_TRANSITIONS) as SourceState[]
    assert.deepEqual([...reachable(SOURCE_TRANSITIONS, 'setup')].sort(), [...states].sort())
    const terminal = states.filter((s) => SOURCE_TRANSITIONS[s].length === 0).sort()
    assert.deepEqual(terminal, ['completed', 'in-doubt', 'lent', 'lost', 'rolled-back'])
    for (const s of states) {
      const ends = reachable(SOURCE_TRANSITIONS, s)
      assert.ok(
        terminal.some((t) => ends.has(t)),
        `${s} cannot reach a terminal state`,
      )
    }
  })

  it('every destination state is reachable from preparing; terminal ones are running, discarded, refused, lost', () => {
    const states = Object.keys(DESTINATION_TRANSITIONS) as DestinationState[]
    assert.deepEqual([...reachable(DESTINATION_TRANSITIONS, 'preparing')].sort(), [...states].sort())
    assert.deepEqual(states.filter((s) => DESTINATION_TRANSITIONS[s].length === 0).sort(), [
      'discarded',
      'lost',
      'refused',
      'running',
    ])
    // Once the guest resumed here nothing leads to discarding it.
    assert.ok(!reachable(DESTINATION_TRANSITIONS, 'resumed').has('discarding'))
  })

  it('a failure before the commit rolls back, after it is in doubt, after the handover the VM moved', () => {
    const expect: Record<SourceState, string> = {
      setup: 'rollback',
      bulk: 'rollback',
      precopy: 'rollback',
      switching: 'rollback',
      paused: 'rollback',
      committed: 'in-doubt',
      postcopy: 'lent',
      lent: 'lent',
      declined: 'rollback',
      handover: 'moved',
      'rolling-back': 'rollback',
      completed: 'moved',
      'rolled-back': 'rollback',
      'in-doubt': 'in-doubt',
      lost: 'lost',
    }
    for (const s of Object.keys(SOURCE_TRANSITIONS) as SourceState[])
      assert.equal(sourceFailureOutcome(s), expect[s], s)
    // Rollback is possible from every state whose failure means rollback (except the rollback itself).
    for (const s of Object.keys(expect) as SourceState[])
      if (expect[s] === 'rollback' && s !== 'rolling-back' && s !== 'rolled-back')
        assert.ok(SOURCE_TRANSITIONS[s].includes('rolling-back'), `${s} → rolling-back`)
    // Never back to running here after the commit without an answer: committed cannot roll back.
    assert.ok(!SOURCE_TRANSITIONS.committed.includes('rolling-back'))
    // Post-copy: the guest runs there on memory lent from here; nothing leads back to running here.
    assert.ok(!reachable(SOURCE_TRANSITIONS, 'postcopy').has('rolling-back'))
  })

  it('transitions check their from-state and the table', () => {
    const seen: string[] = []
    const m = new StateMachine<SourceState>('test', 'setup', SOURCE_TRANSITIONS, (t) =>
      seen.push(`${t.from}>${t.to}`),
    )
    m.set('setup', 'bulk')
    assert.throws(() => m.set('setup', 'bulk'), { name: 'MigrationStateError' })
    assert.throws(() => m.to('committed'), { name: 'MigrationStateError' })
    m.to('precopy')
    assert.equal(m.state, 'precopy')
    assert.ok(m.reached('bulk') && !m.reached('paused'))
    assert.deepEqual(seen, ['setup>bulk', 'bulk>precopy'])
  })
})
