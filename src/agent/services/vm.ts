import { createHash } from 'node:crypto'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import type { VmDriver } from '../../../vm/driver/interfaces.ts'
import { VmManager } from '../../../vm/manager.ts'
import { createQemuDriver } from '../../../vm/qemu/driver.ts'
import { validateVmSpec } from '../../../vm/spec.ts'
import { UsageError } from '../../base/errors.ts'
import type { Logger } from '../../base/log.ts'
import type { ControlHandlers } from '../../control/api.ts'
import type { AgentService } from '../interfaces.ts'

/** Unix socket paths are limited to 107 bytes: keep the per-VM run dir short. */
export function runDirFor(stateDir: string): string {
  const dir = join(resolve(stateDir), 'run')
  if (dir.length <= 60) return dir
  const h = createHash('sha256').update(resolve(stateDir)).digest('hex').slice(0, 12)
  return join(tmpdir(), `mesh-run-${h}`)
}

/** The VM manager of a state dir, with the QEMU driver configured for it. */
export function createLocalVmManager(stateDir: string, driver?: VmDriver): VmManager {
  return new VmManager({
    driver:
      driver ?? createQemuDriver({ runDir: runDirFor(stateDir), diskDir: join(resolve(stateDir), 'disks') }),
    dir: join(resolve(stateDir), 'vms'),
  })
}

function nameParam(params: unknown): string {
  const name = (params as { name?: unknown } | null)?.name
  if (typeof name !== 'string' || name === '') throw new UsageError('vm: missing name')
  return name
}

export interface VmService extends AgentService {
  handlers(): ControlHandlers<'vm.run' | 'vm.ls' | 'vm.stop' | 'vm.console'>
}

/**
 * The agent service that hosts the VM manager: `vm.run`, `vm.ls`, `vm.stop`, `vm.console`. On agent
 * stop the VMs keep running (detached); the next agent re-adopts them in start().
 */
export function createVmService(options: { manager: VmManager; log?: Logger }): VmService {
  const { manager } = options
  manager.on('exited', ({ name, exit }) =>
    options.log?.warn('VM exited', {
      vm: name,
      code: exit.code,
      signal: exit.signal,
      lastLines: exit.lastLines.slice(-5),
    }),
  )
  return {
    name: 'vm',
    async start(signal) {
      await manager.init(signal)
    },
    async stop() {
      await manager.close()
    },
    handlers() {
      return {
        'vm.run': async (params, ctx) =>
          manager.run(validateVmSpec((params as { spec?: unknown })?.spec), ctx.signal),
        'vm.ls': async () => ({ vms: await manager.list() }),
        'vm.stop': async (params, ctx) => manager.stop(nameParam(params), ctx.signal),
        'vm.console': async (params) => {
          const lines = (params as { lines?: unknown })?.lines
          return { lines: await manager.console(nameParam(params), typeof lines === 'number' ? lines : 50) }
        },
      } satisfies ControlHandlers<'vm.run' | 'vm.ls' | 'vm.stop' | 'vm.console'>
    },
    status() {
      return manager.summary()
    },
  }
}
