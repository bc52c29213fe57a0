/**
 * Where a VM is, judged from the last progress event of its move: what the CLI and the requesting
 * member say when they lose sight of the move (the agent died, the link to the VM's host broke).
 */
import type { MigrationProgress } from './interfaces.ts'

export interface Whereabouts {
  /** 'running', 'paused' or 'unknown' (the switch may or may not have completed). */
  status: 'running' | 'paused' | 'unknown'
  /** Member name (or PeerId) the VM was last known on. */
  on: string | undefined
  /** One sentence for a person. */
  text: string
}

export function whereabouts(vm: string, last: MigrationProgress | undefined): Whereabouts {
  if (last === undefined)
    return {
      status: 'unknown',
      on: undefined,
      text: `no progress was reported for VM '${vm}' before contact was lost (see 'mesh vm tokens ${vm}')`,
    }
  const from = last.from ?? 'the source'
  const to = last.to ?? 'the destination'
  const at = `${(last.elapsedMs / 1000).toFixed(1)} s into the move`
  switch (last.phase) {
    case 'prepare':
    case 'bulk':
    case 'precopy':
      return {
        status: 'running',
        on: last.from,
        text: `VM '${vm}' was last seen running on ${from} (phase ${last.phase}, ${at}); a move that stops before the switch leaves it there`,
      }
    case 'switch':
      return {
        status: 'unknown',
        on: last.from,
        text: `VM '${vm}' was last seen paused on ${from} in the switch to ${to} (${at}): it runs on exactly one of them once they settle; see 'mesh vm tokens ${vm}'`,
      }
    case 'resumed':
    case 'done':
      return { status: 'running', on: last.to, text: `VM '${vm}' was last seen running on ${to} (${at})` }
    case 'postcopy':
      return {
        status: 'running',
        on: last.to,
        text: `VM '${vm}' was last seen running on ${to} in post-copy (${at}): part of its memory was still only on ${from}, whose paused copy sends it when the two agents reach each other again; see 'mesh vm tokens ${vm}'`,
      }
    case 'rollback':
    case 'failed':
      return {
        status: 'running',
        on: last.from,
        text: `VM '${vm}' was last seen rolling back to ${from} (${at})`,
      }
  }
}
