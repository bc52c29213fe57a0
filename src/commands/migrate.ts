import { Command, InvalidArgumentError } from 'commander'
import type { MigrationProgress, MigrationReport } from '../../vm/migration/interfaces.ts'
import { whereabouts } from '../../vm/migration/whereabouts.ts'
import type { MigrateParams } from '../agent/services/migration.ts'
import { MeshError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { AgentUnavailableError } from '../control/client.ts'
import { createProgressRenderer, formatBytes } from '../progress.ts'
import { interruptSignal, jsonOption, type StateOpts, stateOption, withAgent } from './common.ts'

/** Exit status of a move that completed but missed its --deadline. */
export const EXIT_DEADLINE_MISSED = 3

/** `25s`, `1500ms`, `2m`, or a bare number of seconds. */
export function parseDuration(v: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(v.trim())
  if (m === null) throw new InvalidArgumentError('--deadline must look like 25s, 1500ms or 2m')
  const n = Number(m[1])
  const ms = m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : n * 1000
  if (!Number.isFinite(ms) || ms < 1000) throw new InvalidArgumentError('--deadline must be at least 1s')
  return Math.round(ms)
}

function formatReport(r: MigrationReport): string {
  const ms = (v: number) => `${Math.round(v)} ms`
  return [
    `moved ${r.vm}: ${r.fromName ?? r.from} → ${r.toName ?? r.to} (token ${r.token})`,
    `  total       ${ms(r.totalMs)}${r.deadlineMs === undefined ? '' : ` (deadline ${ms(r.deadlineMs)})`}`,
    `  downtime    ${ms(r.downtimeMs)} (source view ${ms(r.downtimeSourceMs)}, rtt ${r.rttMs.toFixed(1)} ms)`,
    `  on the wire ${formatBytes(r.wireBytes)} for ${formatBytes(r.ramBytes)} of non-zero RAM`,
    `  skipped     ${formatBytes(r.dedupBytes)} already at the destination, ${formatBytes(r.dupPageBytes)} duplicate pages`,
    `  rounds      ${r.rounds} pre-copy, final delta ${formatBytes(r.finalDeltaBytes)}, device state ${formatBytes(r.deviceStateBytes)}${r.deviceStateWireBytes === undefined ? '' : ` (${formatBytes(r.deviceStateWireBytes)} on the wire)`} (switch: ${r.switchReason})`,
  ].join('\n')
}

/** One JSON object per line on stdout (--json): progress events, warnings, and the final report or failure. */
function jsonLine(value: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(value)}\n`)
}

/** The move completed but took longer than --deadline: a warning, and a non-zero exit. */
export class DeadlineMissedError extends MeshError {
  constructor(message: string) {
    super(message, { code: 'E_DEADLINE_MISSED', exitCode: EXIT_DEADLINE_MISSED })
  }
}

export const migrate: CommandModule = {
  build: () =>
    new Command('migrate')
      .description('live-migrate a VM to another member (from any member: the request goes to its host)')
      .argument('<vm>', 'VM name')
      .requiredOption('--to <peer>', 'destination member (name or PeerId; a unique prefix is enough)')
      .option(
        '--deadline <duration>',
        `finish the whole move within this time (e.g. 25s); a move that completes late exits with status ${EXIT_DEADLINE_MISSED}`,
        parseDuration,
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .addHelpText(
        'after',
        '\nWith --json, stdout carries one JSON object per line: {"event":"progress",...} while the move runs,\n' +
          '{"event":"warning",...} for a missed deadline, then {"event":"done",...report} or {"event":"failed",...}.\n' +
          `Exit status: 0 moved, ${EXIT_DEADLINE_MISSED} moved after the deadline, 1 failed (the message says where the VM is).`,
      )
      .action(async (vm: string, opts: StateOpts & { to: string; deadline?: number; json: boolean }) => {
        const signal = interruptSignal()
        // The human view is a progress bar on stderr; the machine view is every event on stdout.
        const bar = opts.json ? undefined : createProgressRenderer({ label: vm })
        const params: MigrateParams = { vm, to: opts.to }
        if (opts.deadline !== undefined) params.deadlineMs = opts.deadline
        let last: MigrationProgress | undefined
        let report: MigrationReport
        try {
          report = await withAgent(opts, (c) =>
            c.call('migrate', params, {
              signal,
              onEvent: (p) => {
                last = p
                if (opts.json) {
                  jsonLine({ event: 'progress', ...p })
                  return
                }
                bar?.update({
                  phase: p.phase,
                  doneBytes: p.phaseDoneBytes ?? p.ramBytes,
                  totalBytes: p.phaseBytes ?? p.ramBytes,
                  rateBps: p.rateBytesPerSec,
                  round: p.round,
                  wire: formatBytes(p.wireBytes),
                  dirtyRate: `${(p.dirtyRateBytesPerSec / 1e6).toFixed(1)} MB/s`,
                })
              },
            }),
          ).finally(() => bar?.done())
        } catch (err) {
          let failure = err
          if (err instanceof AgentUnavailableError && last !== undefined)
            // The agent died (or was stopped) mid-move: say where the VM was last known to be.
            failure = new MeshError(
              `the agent stopped during the move (${err.message}); ${whereabouts(vm, last).text}`,
              {
                code: 'E_AGENT_LOST',
                cause: err,
              },
            )
          if (opts.json) {
            const where = whereabouts(vm, last)
            jsonLine({
              event: 'failed',
              vm,
              code: (failure as { code?: string }).code ?? 'E_MIGRATION',
              message: failure instanceof Error ? failure.message : String(failure),
              lastKnown: {
                status: where.status,
                ...(where.on === undefined ? {} : { on: where.on }),
                phase: last?.phase ?? null,
              },
            })
          }
          throw failure
        }
        const missed = report.deadlineMs !== undefined && report.totalMs > report.deadlineMs
        const warning = missed
          ? `VM '${vm}' moved to ${report.toName ?? report.to}, but after ${(report.totalMs / 1000).toFixed(1)} s: the deadline was ${(report.deadlineMs! / 1000).toFixed(1)} s`
          : undefined
        if (opts.json) {
          if (warning !== undefined)
            jsonLine({ event: 'warning', code: 'E_DEADLINE_MISSED', message: warning })
          jsonLine({ event: 'done', ...report, ...(missed ? { deadlineMissed: true } : {}) })
        } else process.stdout.write(`${formatReport(report)}\n`)
        if (warning !== undefined) throw new DeadlineMissedError(warning)
      }),
}
