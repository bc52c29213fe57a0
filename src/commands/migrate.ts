import { Command, InvalidArgumentError, Option } from 'commander'
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

/** `25s`, `1500ms`, `2m`, or a bare number of seconds (commander's parser for --deadline). */
export function parseDuration(v: string): number {
  return parseDurationOf(v, '--deadline', 1000)
}

/** The same for another flag with its own minimum. */
export function parseDurationOf(v: string, flag: string, minMs: number): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(v.trim())
  if (m === null) throw new InvalidArgumentError(`${flag} must look like 25s, 1500ms or 2m`)
  const n = Number(m[1])
  const ms = m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : n * 1000
  if (!Number.isFinite(ms) || ms < minMs)
    throw new InvalidArgumentError(
      `${flag} must be at least ${minMs >= 1000 ? `${minMs / 1000}s` : `${minMs}ms`}`,
    )
  return Math.round(ms)
}

const MODES = ['auto', 'precopy', 'postcopy'] as const

/** What --help says about modes and faults (#15): the user must know what post-copy risks. */
const MODES_HELP = `
Modes (the report says which one a move used):
  precopy   memory is copied while the guest runs, in rounds of what it rewrote; the guest pauses only
            for the last small rest and resumes on the destination with all of its memory there. A
            guest that rewrites memory faster than the link carries it is slowed down (its vCPUs get
            less CPU, step by step) until the rounds catch up; the throttle ends with the move.
  postcopy  the guest resumes on the destination BEFORE the memory it rewrote meanwhile has arrived;
            each missing chunk is fetched when the guest first touches it, the rest follows in the
            background, hottest first. The pause stays short whatever the guest does, but until the
            last chunk arrives the VM needs both hosts:
              - source agent killed: the guest waits on what it touches of the missing memory (its
                paused copy on the source outlives the agent); the restarted source agent sends the
                rest. If the source host itself is lost, so is the VM: the destination stops it and
                reports the loss (it never runs on missing memory).
              - destination agent killed: the guest waits likewise; the restarted agent takes the
                paging over again from its QEMU and fetches the rest.
              - link cut: the guest waits on what it touches; when the link is back the rest
                follows. Never two running copies: the source's copy stays paused until the end.
  auto      (default) precopy, with throttling; postcopy only when precopy cannot keep the pause
            within --max-pause (given, or 1s with --deadline) and the destination can page.

With --deadline, the move is measured for a few seconds first (link rate, the guest's dirty rate): a
deadline no mode can meet is refused at once, with the numbers, the VM untouched where it runs; with
--best-effort it goes anyway, as fast as it can (post-copy as soon as the rest no longer fits the pause,
when the destination can page: no further pre-copy round), and the report says by how much it missed.
Every spot evacuation moves this way.`

function formatReport(r: MigrationReport): string {
  const ms = (v: number) => `${Math.round(v)} ms`
  const mbps = (v: number) => `${(v / 1e6).toFixed(1)} MB/s`
  const extra: string[] = []
  if (r.mode !== undefined)
    extra.push(
      `  mode        ${r.mode}${r.maxPauseMs === undefined ? '' : ` (pause bound ${ms(r.maxPauseMs)})`}${r.deadlineMissedByMs === undefined ? '' : `; MISSED the deadline by ${ms(r.deadlineMissedByMs)}`}`,
    )
  if (r.estimate !== undefined)
    extra.push(
      `  estimate    link ${mbps(r.estimate.linkBytesPerSec)}, guest dirtied ${mbps(r.estimate.dirtyBytesPerSec)}, ${formatBytes(r.estimate.outstandingBytes)} to send: ≥ ${ms(r.estimate.minTotalMs)}, planned ~${ms(r.estimate.totalMs)} (${r.estimate.mode}, pause ~${ms(r.estimate.pauseMs)})`,
    )
  if (r.throttle !== undefined)
    extra.push(
      `  throttle    vCPUs throttled up to ${(r.throttle.maxLevel * 100).toFixed(1)}% in ${r.throttle.steps} steps (${r.throttle.backend}); lifted`,
    )
  if (r.postcopy !== undefined)
    extra.push(
      `  post-copy   ${formatBytes(r.postcopy.owedBytes)} owed at the switch, placed in ${ms(r.postcopy.ms)}; ${r.postcopy.faults} fetched on first touch (longest wait ${ms(r.postcopy.maxFaultWaitMs)}), ${r.postcopy.backgroundChunks} chunks in the background${r.postcopy.sessions > 1 ? `, over ${r.postcopy.sessions} links` : ''}`,
    )
  return [
    `moved ${r.vm}: ${r.fromName ?? r.from} → ${r.toName ?? r.to} (token ${r.token})`,
    `  total       ${ms(r.totalMs)}${r.deadlineMs === undefined ? '' : ` (deadline ${ms(r.deadlineMs)})`}`,
    `  downtime    ${ms(r.downtimeMs)} (source view ${ms(r.downtimeSourceMs)}, rtt ${r.rttMs.toFixed(1)} ms)`,
    `  on the wire ${formatBytes(r.wireBytes)} for ${formatBytes(r.ramBytes)} of non-zero RAM`,
    `  skipped     ${formatBytes(r.dedupBytes)} already at the destination, ${formatBytes(r.dupPageBytes)} duplicate pages`,
    `  rounds      ${r.rounds} pre-copy, final delta ${formatBytes(r.finalDeltaBytes)}, device state ${formatBytes(r.deviceStateBytes)}${r.deviceStateWireBytes === undefined ? '' : ` (${formatBytes(r.deviceStateWireBytes)} on the wire)`} (switch: ${r.switchReason})`,
    ...extra,
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
      .option(
        '--max-pause <duration>',
        'never pause the guest longer than this (default 1s with --deadline)',
        (v) => parseDurationOf(v, '--max-pause', 1),
      )
      .option('--best-effort', 'with --deadline: move even when the estimate says it cannot be met')
      .addOption(
        new Option('--mode <mode>', 'precopy, postcopy, or auto: see below').choices(MODES).default('auto'),
      )
      .addOption(stateOption())
      .addOption(jsonOption())
      .addHelpText(
        'after',
        '\nWith --json, stdout carries one JSON object per line: {"event":"progress",...} while the move runs\n' +
          '(with the estimate: link and dirty rates, what is left, the plan), {"event":"warning",...} for a\n' +
          'missed deadline, then {"event":"done",...report} or {"event":"failed",...}.\n' +
          `Exit status: 0 moved, ${EXIT_DEADLINE_MISSED} moved after the deadline, 1 failed (the message says where the VM is).\n` +
          MODES_HELP,
      )
      .action(
        async (
          vm: string,
          opts: StateOpts & {
            to: string
            deadline?: number
            maxPause?: number
            bestEffort?: boolean
            mode: (typeof MODES)[number]
            json: boolean
          },
        ) => {
          const signal = interruptSignal()
          // The human view is a progress bar on stderr; the machine view is every event on stdout.
          const bar = opts.json ? undefined : createProgressRenderer({ label: vm })
          const params: MigrateParams = { vm, to: opts.to }
          if (opts.deadline !== undefined) params.deadlineMs = opts.deadline
          if (opts.maxPause !== undefined) params.maxPauseMs = opts.maxPause
          if (opts.bestEffort === true) params.bestEffort = true
          if (opts.mode !== 'auto') params.mode = opts.mode
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
                  const est = p.estimate
                  bar?.update({
                    phase: p.phase,
                    doneBytes: p.phaseDoneBytes ?? p.ramBytes,
                    totalBytes: p.phaseBytes ?? p.ramBytes,
                    rateBps: p.rateBytesPerSec,
                    ...(est === undefined ? {} : { etaMs: Math.max(0, est.totalMs - p.elapsedMs) }),
                    round: p.round,
                    wire: formatBytes(p.wireBytes),
                    dirtyRate: `${(p.dirtyRateBytesPerSec / 1e6).toFixed(1)} MB/s`,
                    ...(p.throttle === undefined || p.throttle === 0
                      ? {}
                      : { throttle: `${(p.throttle * 100).toFixed(1)}%` }),
                    ...(est === undefined
                      ? {}
                      : {
                          link: `${(est.linkBytesPerSec / 1e6).toFixed(1)} MB/s`,
                          plan: `${est.mode}, pause ~${(est.pauseMs / 1000).toFixed(1)}s${est.feasible === false ? ', deadline MISSED' : ''}`,
                        }),
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
        },
      ),
}
