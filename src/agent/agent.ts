import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { describeError, MeshError } from '../base/errors.ts'
import type { Logger } from '../base/log.ts'
import { statePaths } from '../config.ts'
import type { AgentStatus, ControlHandler } from '../control/api.ts'
import { type ControlServer, createControlServer, type Handler } from '../control/server.ts'
import type { AgentService } from './interfaces.ts'

export class AgentError extends MeshError {}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/**
 * One agent per state dir: a second one would steal the control socket and fight over the identity.
 * The pid file is created exclusively; a stale one (its process is gone) is taken over.
 */
function lockStateDir(dir: string): () => void {
  const file = join(dir, 'agent.pid')
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(file, `${process.pid}\n`, { flag: 'wx', mode: 0o600 })
      return () => {
        try {
          if (readFileSync(file, 'utf8').trim() === String(process.pid)) rmSync(file, { force: true })
        } catch {
          // Already gone: nothing to release.
        }
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
      const pid = Number.parseInt(readFileSync(file, 'utf8'), 10)
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && isAlive(pid)) {
        throw new AgentError(`an agent is already running for ${dir} (pid ${pid}); stop it first`, {
          code: 'E_AGENT_RUNNING',
        })
      }
      rmSync(file, { force: true })
    }
  }
  throw new AgentError(`cannot lock ${dir}`)
}

export interface AgentInit {
  stateDir: string
  services: AgentService[]
  log: Logger
}

export interface Agent {
  start(): Promise<void>
  stop(): Promise<void>
  /** Resolves when the agent has stopped (by stop() or the control API's 'agent.stop'). */
  wait(): Promise<void>
  /** The control API methods it serves (its services' and its own), sorted. */
  methods(): string[]
}

/** Composes services behind one control socket and one lifecycle. */
export function createAgent(init: AgentInit): Agent {
  const paths = statePaths(init.stateDir)
  const log = init.log
  const ac = new AbortController()
  const started: AgentService[] = []
  const startedAt = Date.now()
  let control: ControlServer | undefined
  let unlock: (() => void) | undefined
  let stopping: Promise<void> | undefined
  let resolveStopped!: () => void
  const stopped = new Promise<void>((r) => {
    resolveStopped = r
  })

  const handlers: Record<string, Handler> = {}
  const register = (svc: AgentService) => {
    for (const [method, h] of Object.entries(svc.handlers())) {
      if (Object.hasOwn(handlers, method)) throw new AgentError(`two services answer '${method}'`)
      handlers[method] = h
    }
  }
  for (const svc of init.services) register(svc)
  handlers.status = (async () => {
    const status: AgentStatus = {
      pid: process.pid,
      uptimeMs: Date.now() - startedAt,
      stateDir: paths.dir,
    }
    for (const svc of started) if (svc.status !== undefined) status[svc.name] = svc.status()
    return status
  }) satisfies ControlHandler<'status'>
  handlers['agent.stop'] = (async () => {
    // Answer first, then stop: the caller gets its reply before the socket goes away.
    setImmediate(() => void agent.stop())
    return { stopping: true as const }
  }) satisfies ControlHandler<'agent.stop'>

  const agent: Agent = {
    async start() {
      mkdirSync(paths.dir, { recursive: true, mode: 0o700 })
      unlock = lockStateDir(paths.dir)
      try {
        for (const svc of init.services) {
          log.debug('starting service', { service: svc.name })
          await svc.start(ac.signal)
          started.push(svc)
        }
        control = createControlServer({ path: paths.controlSocket, handlers, log })
        await control.start()
      } catch (err) {
        log.error('agent failed to start', { error: describeError(err) })
        await agent.stop()
        throw err
      }
      log.info('agent ready', { socket: paths.controlSocket })
    },
    stop() {
      stopping ??= (async () => {
        ac.abort(new AgentError('agent stopping'))
        await control?.stop()
        for (const svc of started.reverse()) {
          try {
            await svc.stop()
          } catch (err) {
            // Keep stopping the others: one failing service must not leave the rest running.
            log.error('service failed to stop', { service: svc.name, error: describeError(err) })
          }
        }
        unlock?.()
        resolveStopped()
      })()
      return stopping
    },
    wait: () => stopped,
    methods: () => Object.keys(handlers).sort(),
  }
  return agent
}
