import { Command, Option } from 'commander'
import type { EvacuationEvent, EvacuationReport, VmEvacuation } from '../agent/spot/interfaces.ts'
import { MeshError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import type { EvacuateParams } from '../control/api.ts'
import { createProgressRenderer, formatBytes, type ProgressRenderer } from '../progress.ts'
import { formatTable, interruptSignal, jsonOption, type StateOpts, stateOption, withAgent } from './common.ts'
import { parseDuration } from './migrate.ts'

/** Not every VM left: the report says which and why (exit status 1 after printing it). */
export class EvacuationIncompleteError extends MeshError {
  constructor(message: string) {
    super(message, { code: 'E_EVACUATION_INCOMPLETE' })
  }
}

const secs = (ms: number | undefined) => (ms === undefined ? '-' : `${(ms / 1000).toFixed(1)} s`)

/** How a move went: its switch, post-copy (ran there at …, memory complete at AT), throttle, lateness. */
function movedNote(v: VmEvacuation): string {
  const parts = [`switch: ${v.switchReason ?? '?'}`]
  if (v.mode === 'postcopy')
    parts.push(
      `post-copy: ran there at ${secs(v.resumedAtMs)}, ${v.postcopyFaults ?? 0} faults, memory complete ${secs(v.postcopyMs)} later`,
    )
  if (v.throttleMax !== undefined && v.throttleMax > 0)
    parts.push(`vCPUs throttled up to ${Math.round(v.throttleMax * 100)}%`)
  if (v.deadlineMissedByMs !== undefined) parts.push(`${secs(v.deadlineMissedByMs)} over its time`)
  return parts.join('; ')
}

export function formatEvacuationReport(r: EvacuationReport): string {
  const moved = r.vms.filter((v) => v.outcome === 'moved').length
  const head =
    r.vms.length === 0
      ? `${r.host}: no VMs to move`
      : `${r.host}: ${moved} of ${r.vms.length} VM${r.vms.length === 1 ? '' : 's'} moved in ${secs(r.doneMs)}` +
        (r.planMs === undefined ? '' : ` (plan ${secs(r.planMs)}, deadline ${r.deadlineAt})`)
  if (r.vms.length === 0) return head
  const rows = r.vms.map((v) => [
    v.vm,
    v.outcome,
    v.toName ?? '-',
    secs(v.atMs),
    v.downtimeMs === undefined ? '-' : `${v.downtimeMs} ms`,
    v.wireBytes === undefined ? '-' : formatBytes(v.wireBytes),
    v.outcome === 'moved' ? movedNote(v) : (v.error ?? ''),
  ])
  return `${head}\n${formatTable(['VM', 'OUTCOME', 'TO', 'AT', 'DOWNTIME', 'WIRE', 'NOTE'], rows)}`
}

/** Events for a person on stderr: the plan and what has no room at once, a progress line per move. */
export function humanEvents(
  out: NodeJS.WritableStream & { isTTY?: boolean; columns?: number } = process.stderr,
) {
  const bars = new Map<string, ProgressRenderer>()
  return {
    onEvent(e: EvacuationEvent) {
      switch (e.event) {
        case 'plan': {
          const silent = e.members.filter((m) => !m.answered)
          out.write(
            e.assignments.length + e.unplaced.length === 0
              ? 'no VMs here\n'
              : `plan: ${e.assignments.map((a) => `${a.vm} → ${a.toName} (${a.why.join(', ') || 'room'})`).join('; ') || 'nothing can move'}${silent.length > 0 ? `; no answer from ${silent.map((m) => m.name).join(', ')}` : ''}\n`,
          )
          if (e.shortfall !== undefined) out.write(`shortfall: ${e.shortfall}\n`)
          break
        }
        case 'no-room':
          out.write(`${e.vm}: ${e.reason}\n`)
          break
        case 'shortfall':
          out.write(`shortfall: ${e.detail}\n`)
          break
        case 'moving':
          out.write(
            `${e.vm}: moving to ${e.toName}${e.deadlineMs === undefined ? '' : ` within ${secs(e.deadlineMs)}`}\n`,
          )
          bars.set(e.vm, createProgressRenderer({ label: e.vm, out }))
          break
        case 'progress':
          bars.get(e.vm)?.update({
            phase: e.phase,
            doneBytes: e.ramBytes,
            totalBytes: Math.max(e.ramBytes, 1),
            rateBps: e.rateBytesPerSec,
            round: e.round,
            wire: formatBytes(e.wireBytes),
          })
          break
        case 'moved':
        case 'failed':
          bars.get(e.vm)?.done()
          bars.delete(e.vm)
          out.write(
            e.event === 'moved'
              ? `${e.vm}: runs on ${e.toName} at ${secs(e.atMs)} (down ${e.downtimeMs} ms${e.mode === 'postcopy' ? `, post-copy: ran there at ${secs(e.resumedAtMs)}` : ''})\n`
              : `${e.vm}: moving to ${e.toName} failed: ${e.error}\n`,
          )
          break
        default:
          break
      }
    },
  }
}

/** Runs `evacuate`/`drain` on the agent and prints events and the report (--json: one object a line). */
export async function runEvacuation(
  method: 'evacuate' | 'drain',
  params: EvacuateParams,
  opts: StateOpts & { json: boolean },
): Promise<void> {
  const signal = interruptSignal()
  const human = humanEvents()
  const report = (await withAgent(opts, (c) =>
    c.call(method, params, {
      signal,
      onEvent: (ev) => {
        if (opts.json) process.stdout.write(`${JSON.stringify(ev)}\n`)
        else human.onEvent(ev)
      },
    }),
  )) as EvacuationReport // drain answers { draining: false } only when asked with off
  if (opts.json) process.stdout.write(`${JSON.stringify(report)}\n`)
  else process.stdout.write(`${formatEvacuationReport(report)}\n`)
  if (!report.complete) {
    const left = report.vms.filter((v) => v.outcome !== 'moved').map((v) => v.vm)
    throw new EvacuationIncompleteError(`${left.length} VM(s) did not leave: ${left.join(', ')}`)
  }
}

export const evacuate: CommandModule = {
  build: () =>
    new Command('evacuate')
      .description(
        'move every VM of this host to members with room (as a spot notice would): placement prefers a standby, another provider, a better link, a cheaper price',
      )
      .option('--to <peer>', 'move every VM to this member only')
      .addOption(
        new Option(
          '--deadline <duration>',
          'plan the whole evacuation to finish within this time (e.g. 30s)',
        ).argParser(parseDuration),
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (opts: StateOpts & { to?: string; deadline?: number; json: boolean }) => {
        await runEvacuation(
          'evacuate',
          {
            ...(opts.to === undefined ? {} : { to: opts.to }),
            ...(opts.deadline === undefined ? {} : { deadlineMs: opts.deadline }),
          },
          opts,
        )
      }),
}
