import type { PathInfo, PathType } from '../link/interfaces.ts'

/** A candidate's type as the link reports it (RFC 8445 types; anything else counts as host). */
export function asPathType(t: string | undefined): PathType {
  return t === 'srflx' || t === 'prflx' || t === 'relay' ? t : 'host'
}

const PATH_RANK: Record<PathType, number> = { memory: -1, host: 0, prflx: 1, srflx: 2, relay: 3 }

/** The selected candidate pair as a PathInfo: its type is the more indirect of the two ends' (relay if
 *  either end relays, and so on). */
export function pairPath(
  local: { type: string; addr: string },
  remote: { type: string; addr: string },
): PathInfo {
  const lt = asPathType(local.type)
  const rt = asPathType(remote.type)
  return {
    type: PATH_RANK[lt] >= PATH_RANK[rt] ? lt : rt,
    local: `${lt} ${local.addr}`,
    remote: `${rt} ${remote.addr}`,
  }
}
