/**
 * The migration state machines: one state field per session and named transitions, as QEMU's
 * `migrate_set_state()` (the transition names its expected from-state; a wrong one is a bug and throws).
 * The tables below are the whole truth about which step may follow which; ARCHITECTURE.md ("Migration
 * state machines") shows the same tables with what each state means for the guest and the fencing token.
 *
 * Adding a phase (throttling, post-copy, disk rounds...): add its state and its edges here, then the
 * step that runs it in source.ts / destination.ts. What a failure in the new state means (roll back,
 * in doubt, still moved) is decided by `sourceFailureOutcome()` below, which must name every state.
 */
import { MigrationStateError } from './errors.ts'

/**
 * Source states, in order:
 *  - setup      prepare/accept, clock pings; nothing of the guest has moved
 *  - bulk       dirty tracking started, first full pass of RAM (offer/want/data)
 *  - precopy    reference device state, then rounds of what the guest dirtied, until decideSwitch() says
 *  - switching  the switch record is being persisted; the guest still runs
 *  - paused     the guest is paused here: final delta, device state, waiting for 'ready'
 *  - committed  'commit' sent: point of no return; waiting for 'resumed' (or asking: resolveInDoubt)
 *  - postcopy   the guest runs on the destination, which still lacks the owed chunks: our paused copy
 *               lends them (postcopy-source.ts) until 'pcdone'; never resumed, never stopped meanwhile
 *  - declined   after the commit the destination answered that it never resumed and never will
 *  - lost       after the commit the destination answered that its copy ran and is gone: ours is older,
 *               stays paused, and only an operator's `mesh vm recover` resumes it
 *  - handover   the destination runs the VM: record the token, stop and forget our copy
 *  - rolling-back  before the commit something failed: abort sent, resume our copy, end the record
 * Terminal: completed (runs there), rolled-back (runs here), in-doubt (paused here; settle.ts takes over),
 * lost (paused here, older than what ran there), lent (post-copy unfinished: the guest runs there, our paused copy keeps the memory it still needs and
 * the service goes on lending it when the destination comes back).
 */
export type SourceState =
  | 'setup'
  | 'bulk'
  | 'precopy'
  | 'switching'
  | 'paused'
  | 'committed'
  | 'postcopy'
  | 'declined'
  | 'handover'
  | 'rolling-back'
  | 'completed'
  | 'rolled-back'
  | 'in-doubt'
  | 'lost'
  | 'lent'

export const SOURCE_TRANSITIONS: Readonly<Record<SourceState, readonly SourceState[]>> = {
  setup: ['bulk', 'rolling-back'],
  bulk: ['precopy', 'rolling-back'],
  precopy: ['switching', 'rolling-back'],
  switching: ['paused', 'rolling-back'],
  paused: ['committed', 'rolling-back'],
  committed: ['handover', 'postcopy', 'declined', 'in-doubt', 'lost'],
  // Post-copy that the destination gives up on (its copy is lost) leaves ours, older: 'lost'.
  postcopy: ['handover', 'lent', 'lost'],
  declined: ['rolling-back'],
  handover: ['completed'],
  'rolling-back': ['rolled-back'],
  completed: [],
  'rolled-back': [],
  'in-doubt': [],
  lost: [],
  lent: [],
}

/** What a failure in each state leaves: the source's whole `catch`, as a table. */
export type SourceFailure =
  /** Nothing ran elsewhere and nothing will: resume our copy (if paused), end the switch record. */
  | 'rollback'
  /** The commit went out and the destination has not said whether it resumed: stay paused. */
  | 'in-doubt'
  /** The destination runs the VM: our copy must never run again, whatever failed while letting go. */
  | 'moved'
  /** A newer copy ran elsewhere and is gone: ours stays paused until an operator decides. */
  | 'lost'
  /**
   * The destination runs the VM but still needs memory only our paused copy holds: keep the copy (never
   * resume it, never stop it) and lend it when the destination comes back (post-copy).
   */
  | 'lent'

export function sourceFailureOutcome(state: SourceState): SourceFailure {
  switch (state) {
    case 'setup':
    case 'bulk':
    case 'precopy':
    case 'switching':
    case 'paused':
    case 'declined':
    case 'rolling-back':
    case 'rolled-back':
      return 'rollback'
    case 'committed':
    case 'in-doubt':
      return 'in-doubt'
    case 'handover':
    case 'completed':
      return 'moved'
    case 'lost':
      return 'lost'
    case 'postcopy':
    case 'lent':
      return 'lent'
  }
}

/**
 * Destination states:
 *  - preparing   token, name and geometry checks; RAM file allocated; the incoming VM starts
 *  - receiving   'accept' sent: chunks, rounds, device state arrive
 *  - loaded      device state loaded into the (paused) incoming VM, 'ready' sent; waiting for 'commit'
 *  - committed   'commit' received: the token is recorded before the guest may run
 *  - resumed     the guest runs here (never discarded from now on); adopting it
 *  - postcopy    it runs here while the owed chunks arrive (each one the guest touches first is fetched
 *                at once, the rest in the background); the source keeps its paused copy meanwhile
 *  - discarding  before the resume something failed: abort sent, incoming VM stopped, RAM file removed
 * Terminal: running, discarded, refused (nothing was allocated), lost (post-copy could not finish: the
 * source's copy is gone or the pager died; the VM was stopped here and the loss is reported).
 */
export type DestinationState =
  | 'preparing'
  | 'receiving'
  | 'loaded'
  | 'committed'
  | 'resumed'
  | 'postcopy'
  | 'discarding'
  | 'running'
  | 'discarded'
  | 'refused'
  | 'lost'

export const DESTINATION_TRANSITIONS: Readonly<Record<DestinationState, readonly DestinationState[]>> = {
  preparing: ['receiving', 'refused', 'discarding'],
  receiving: ['loaded', 'discarding'],
  loaded: ['committed', 'discarding'],
  committed: ['resumed', 'discarding'],
  resumed: ['running', 'postcopy'],
  postcopy: ['running', 'lost'],
  discarding: ['discarded'],
  running: [],
  discarded: [],
  refused: [],
  lost: [],
}

/** A state change, as listeners (logs, progress, tests) see it. */
export interface Transition<S extends string> {
  from: S
  to: S
  /** ms since the session started. */
  atMs: number
}

/** One state field and a checked transition function. */
export class StateMachine<S extends string> {
  private current: S
  private readonly started = performance.now()
  readonly history: Transition<S>[] = []

  constructor(
    readonly what: string,
    initial: S,
    private readonly table: Readonly<Record<S, readonly S[]>>,
    private readonly onChange?: (t: Transition<S>) => void,
  ) {
    this.current = initial
  }

  get state(): S {
    return this.current
  }

  is(...states: S[]): boolean {
    return states.includes(this.current)
  }

  /** Whether the session ever entered `state`. */
  reached(state: S): boolean {
    return this.history.some((t) => t.to === state)
  }

  /** Moves from `from` to `to`; throws MigrationStateError if the machine is elsewhere or the edge is not in the table. */
  set(from: S, to: S): void {
    if (this.current !== from)
      throw new MigrationStateError(
        `${this.what}: expected state '${from}' for → '${to}', found '${this.current}'`,
      )
    this.to(to)
  }

  /** Moves from wherever it is to `to`, if the table allows that edge. */
  to(to: S): void {
    const from = this.current
    if (!this.table[from].includes(to))
      throw new MigrationStateError(`${this.what}: no transition '${from}' → '${to}'`)
    this.current = to
    const t: Transition<S> = { from, to, atMs: Math.round((performance.now() - this.started) * 10) / 10 }
    this.history.push(t)
    this.onChange?.(t)
  }
}
