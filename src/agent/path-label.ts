import type { MemberStatus } from '../../net/interfaces.ts'

/** Path label of a member's link: the ICE path type, `+direct` when bulk channels ride direct TCP. */
export function pathLabel(m: Pick<MemberStatus, 'path' | 'direct'> | undefined): string {
  if (m?.path === undefined) return 'none'
  return m.direct === undefined ? m.path : `${m.path}+direct`
}
