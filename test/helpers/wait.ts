/**
 * One way for tests to wait on an outcome: poll a condition until it holds, or fail naming what was
 * awaited. Tests wait on outcomes (a state, a counter, a line), never on a sleep tied to a constant.
 */

/** A waited-for condition did not hold in time. */
export class WaitTimeoutError extends Error {
  override name = 'WaitTimeoutError'
}

export interface WaitOptions {
  /** Give up after this long (default 30 s). */
  timeoutMs?: number
  /** Poll interval (default 20 ms; e2e tests that spawn a CLI per poll use more). */
  intervalMs?: number
}

/** Resolves once `cond()` is true; throws WaitTimeoutError("timed out waiting for WHAT") otherwise. */
export async function waitUntil(
  what: string,
  cond: () => boolean | Promise<boolean>,
  options: WaitOptions = {},
): Promise<void> {
  const timeoutMs = options.timeoutMs ?? 30_000
  const intervalMs = options.intervalMs ?? 20
  const end = Date.now() + timeoutMs
  while (!(await cond())) {
    if (Date.now() > end) throw new WaitTimeoutError(`timed out waiting for ${what} (${timeoutMs} ms)`)
    await new Promise((r) => setTimeout(r, intervalMs))
  }
}

/**
 * As waitUntil, but resolves false when the time runs out: for checks that assert with their own
 * message, or that only report how far something got (a lossy channel).
 */
export async function holdsWithin(
  cond: () => boolean | Promise<boolean>,
  timeoutMs: number,
  intervalMs = 20,
): Promise<boolean> {
  try {
    await waitUntil('condition', cond, { timeoutMs, intervalMs })
    return true
  } catch (err) {
    if (err instanceof WaitTimeoutError) return false
    throw err
  }
}
