/**
 * Error classes shared by every layer. Each subsystem derives its own named errors from MeshError so
 * that callers (and tests) can tell failures apart by `name`, and the CLI can print a one-line message
 * a person can act on. The original failure is always kept as `cause`.
 */
export class MeshError extends Error {
  /** Stable machine-readable code, e.g. `E_USAGE`. */
  readonly code: string
  /** Process exit status the CLI uses when this error reaches it. */
  readonly exitCode: number

  constructor(message: string, options: { cause?: unknown; code?: string; exitCode?: number } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.name = new.target.name
    this.code = options.code ?? 'E_MESH'
    this.exitCode = options.exitCode ?? 1
  }
}

/** The user asked for something that cannot be parsed or makes no sense: exit status 2. */
export class UsageError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_USAGE', exitCode: 2 })
  }
}

/** A long operation was cancelled through its AbortSignal. */
export class AbortError extends MeshError {
  constructor(message = 'the operation was aborted', options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_ABORTED' })
  }
}

/** Throws AbortError if the signal has fired; keeps the signal's reason as the cause. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted === true) {
    throw new AbortError('the operation was aborted', { cause: signal.reason })
  }
}

/** A short, one-line description of any thrown value, for logs and the CLI. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message.split('\n')[0] ?? err.name
  return String(err)
}
