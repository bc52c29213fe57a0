import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, realpathSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Command } from 'commander'
import { MeshError } from '../base/errors.ts'
import type { CommandModule } from '../command.ts'
import { renderUnit, UNIT_NAME } from '../ops/systemd-unit.ts'
import { jsonOption, printJson } from './common.ts'

export class ServiceError extends MeshError {}

/** bin/mesh.js of this installation (dist/main.js and src/commands/ both sit one level below it). */
export function meshBin(): string {
  const here = dirname(fileURLToPath(import.meta.url))
  for (const rel of ['../bin/mesh.js', '../../bin/mesh.js']) {
    const p = resolve(here, rel)
    if (existsSync(p)) return realpathSync(p)
  }
  throw new ServiceError('cannot find bin/mesh.js next to this installation')
}

interface InstallOpts {
  unitDir: string
  config: string
  state: string
  print: boolean
  enable: boolean
  json: boolean
  lowPorts: boolean
}

export const service: CommandModule = {
  build() {
    const cmd = new Command('service').description('run the agent as a systemd service')
    cmd
      .command('install')
      .description(
        `write a hardened systemd unit (${UNIT_NAME}) that runs 'mesh agent' with a config file and a state dir`,
      )
      .option('--unit-dir <dir>', 'where to write the unit', '/etc/systemd/system')
      .option('--config <file>', "the agent's config file (README: Configuration)", '/etc/mesh/agent.json')
      .option('--state <dir>', "the agent's state directory", '/var/lib/mesh')
      .option('--low-ports', 'also allow listening on ports below 1024 (CAP_NET_BIND_SERVICE)', false)
      .option('--print', 'print the unit instead of writing it', false)
      .option('--enable', "then run 'systemctl daemon-reload' and 'systemctl enable --now'", false)
      .addOption(jsonOption())
      .action(async (o: InstallOpts) => {
        const text = renderUnit({
          node: process.execPath,
          bin: meshBin(),
          stateDir: resolve(o.state),
          configFile: resolve(o.config),
          bindLowPorts: o.lowPorts,
        })
        if (o.print) return void process.stdout.write(text)
        mkdirSync(o.unitDir, { recursive: true })
        const file = join(o.unitDir, UNIT_NAME)
        writeFileSync(file, text, { mode: 0o644 })
        // The state dir must exist for ReadWritePaths=; owner-only like the agent makes it.
        mkdirSync(resolve(o.state), { recursive: true, mode: 0o700 })
        const steps: string[] = []
        if (o.enable) {
          for (const args of [['daemon-reload'], ['enable', '--now', UNIT_NAME]]) {
            const r = spawnSync('systemctl', args, { encoding: 'utf8' })
            if (r.status !== 0)
              throw new ServiceError(
                `systemctl ${args.join(' ')} failed: ${(r.stderr || r.error?.message || '').trim()}`,
              )
            steps.push(`systemctl ${args.join(' ')}`)
          }
        }
        if (o.json)
          return printJson({ unit: file, config: resolve(o.config), state: resolve(o.state), ran: steps })
        process.stdout.write(
          `wrote ${file}\n` +
            (o.enable
              ? `started: systemctl status ${UNIT_NAME}\n`
              : `next: put the agent's options in ${resolve(o.config)}, then: systemctl daemon-reload && systemctl enable --now ${UNIT_NAME}\n`),
        )
      })
    return cmd
  },
}
