import { Command, InvalidArgumentError } from 'commander'
import type { MigrationProgress, MigrationReport } from '../../vm/migration/interfaces.ts'
import type { CommandModule } from '../command.ts'
import { createProgressRenderer, formatBytes } from '../progress.ts'
import { interruptSignal, jsonOption, printJson, type StateOpts, stateOption, withAgent } from './common.ts'

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
    `moved ${r.vm}: ${r.from} → ${r.to} (token ${r.token})`,
    `  total       ${ms(r.totalMs)}${r.deadlineMs === undefined ? '' : ` (deadline ${ms(r.deadlineMs)})`}`,
    `  downtime    ${ms(r.downtimeMs)} (source view ${ms(r.downtimeSourceMs)}, rtt ${r.rttMs.toFixed(1)} ms)`,
    `  on the wire ${formatBytes(r.wireBytes)} for ${formatBytes(r.ramBytes)} of non-zero RAM`,
    `  skipped     ${formatBytes(r.dedupBytes)} already at the destination, ${formatBytes(r.dupPageBytes)} duplicate pages`,
    `  rounds      ${r.rounds} pre-copy, final delta ${formatBytes(r.finalDeltaBytes)}, device state ${formatBytes(r.deviceStateBytes)}${r.deviceStateWireBytes === undefined ? '' : ` (${formatBytes(r.deviceStateWireBytes)} on the wire)`} (switch: ${r.switchReason})`,
  ].join('\n')
}

export const migrate: CommandModule = {
  build: () =>
    new Command('migrate')
      .description('live-migrate a VM to another member (from any member: the request goes to its host)')
      .argument('<vm>', 'VM name')
      .requiredOption('--to <peer>', 'destination member (name or PeerId; a unique prefix is enough)')
      .option('--deadline <duration>', 'finish the whole move within this time (e.g. 25s)', parseDuration)
      .addOption(stateOption())
      .addOption(jsonOption())
      .action(async (vm: string, opts: StateOpts & { to: string; deadline?: number; json: boolean }) => {
        const signal = interruptSignal()
        const bar = createProgressRenderer({ json: opts.json, label: vm })
        const params: Record<string, unknown> = { vm, to: opts.to }
        if (opts.deadline !== undefined) params.deadlineMs = opts.deadline
        const report = (await withAgent(opts, (c) =>
          c.call('migrate', params, {
            signal,
            onEvent: (e) => {
              const p = e as MigrationProgress
              bar.update({
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
        ).finally(() => bar.done())) as MigrationReport
        if (opts.json) printJson({ event: 'done', ...report })
        else process.stdout.write(`${formatReport(report)}\n`)
      }),
}
