import { MeshError } from '../../src/base/errors.ts'

/** Base of every migration failure. */
export class MigrationError extends MeshError {}

/** A migration message that cannot be decoded (bad version, type, length or field). */
export class MigrationDecodeError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MIGRATION_DECODE' })
  }
}

/** The destination (or the host that runs the VM) said no: the reason is the peer's. */
export class MigrationRefusedError extends MigrationError {
  readonly reason: string
  constructor(reason: string, options: { cause?: unknown; code?: string } = {}) {
    super(`migration refused: ${reason}`, {
      cause: options.cause,
      code: options.code ?? 'E_MIGRATION_REFUSED',
    })
    this.reason = reason
  }
}

/** A command carried a fencing token older than the newest this host has seen for the VM. */
export class StaleTokenError extends MigrationError {
  /** `detail` says what happened and what to do (the destination's refusal carries it to the source). */
  constructor(vm: string, got: number, have: number, detail?: string) {
    super(
      `VM '${vm}': fencing token ${got} is stale (this host has seen ${have})${detail === undefined ? '' : `: ${detail}`}`,
      {
        code: 'E_STALE_TOKEN',
      },
    )
  }
}

/** A wait in the protocol ran out of time (the peer is slow, gone, or the link is stuck). */
export class MigrationTimeoutError extends MigrationError {
  constructor(what: string, ms: number) {
    super(`migration timed out after ${ms} ms waiting for ${what}`, { code: 'E_MIGRATION_TIMEOUT' })
  }
}

/** The link to the peer closed mid-migration. */
export class MigrationLinkError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MIGRATION_LINK' })
  }
}

/** The peer aborted the migration (its reason is in the message). */
export class MigrationAbortedError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MIGRATION_ABORTED' })
  }
}

/**
 * The source committed the switch but could not learn whether the destination resumed (the link died
 * between commit and 'resumed' and the destination stayed unreachable). The VM stays paused on the
 * source: resuming it could make two copies run. Resolved when the destination is reachable again.
 */
export class MigrationInDoubtError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MIGRATION_IN_DOUBT' })
  }
}

/** The request names a VM no reachable member runs, or a peer that is not linked. */
export class MigrationTargetError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MIGRATION_TARGET' })
  }
}

/** A migration state machine was asked for a transition its table does not have (a bug, not a fault). */
export class MigrationStateError extends MigrationError {
  constructor(message: string) {
    super(message, { code: 'E_MIGRATION_STATE' })
  }
}

/**
 * After the commit the destination answered that its copy ran and is gone (its QEMU died after it
 * resumed). The copy on the source is older: it stays paused, and resuming it (losing what ran on the
 * destination) is an operator's decision (`mesh vm recover VM --accept-loss`).
 */
export class MigrationLostError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MIGRATION_LOST' })
  }
}

/**
 * With --deadline: the estimate says no mode can finish the move in time (the message has the
 * numbers). Raised within seconds, before the guest was ever paused; the VM keeps running where it was.
 */
export class MigrationInfeasibleError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_DEADLINE_INFEASIBLE' })
  }
}

/**
 * A move failed and its rollback could not resume the source's paused copy: the VM runs nowhere until
 * an operator acts (the message says where it is stopped and why).
 */
export class MigrationRollbackError extends MigrationError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MIGRATION_ROLLBACK' })
  }
}
