/**
 * Runs `fn` over `items` with at most `limit` calls in flight, in order of the items (each is taken once).
 * `stop`, checked before each item is taken, ends it early. Rejects with the first error; calls already in
 * flight then run to their end, no new ones start.
 */
export async function forEachLimit<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T) => Promise<unknown>,
  stop?: () => boolean,
): Promise<void> {
  let next = 0
  let failed = false
  const worker = async () => {
    while (!failed && next < items.length && stop?.() !== true) {
      try {
        await fn(items[next++]!)
      } catch (err) {
        failed = true
        throw err
      }
    }
  }
  await Promise.all(Array.from({ length: Math.max(0, Math.min(limit, items.length)) }, worker))
}
