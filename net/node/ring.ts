/**
 * The warm set: which members a node keeps a link to at all times. Members sorted by PeerId form a ring;
 * each keeps its `k` nearest (half on each side). The relation is symmetric (b is among a's neighbours
 * exactly when a is among b's), so both ends of a pair agree from the same member set, and the graph is
 * connected with degree k whatever the mesh size. PeerIds are hashes of public keys: a member's ring
 * neighbours are a random sample, not its cloud.
 */
export function ringNeighbours(sortedIds: readonly string[], self: string, k: number): Set<string> {
  const n = sortedIds.length
  const i = sortedIds.indexOf(self)
  const out = new Set<string>()
  if (i < 0) return out
  if (n - 1 <= k) {
    for (const id of sortedIds) if (id !== self) out.add(id)
    return out
  }
  const half = Math.ceil(k / 2)
  for (let d = 1; d <= half; d++) {
    out.add(sortedIds[(i + d) % n]!)
    out.add(sortedIds[(i - d + n) % n]!)
  }
  return out
}
