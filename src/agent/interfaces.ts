import type { Handler } from '../control/server.ts'

/**
 * One subsystem hosted by the agent (overlay node, chunk service, VM manager, migration, tunnel).
 * All share one lifecycle: started in order, stopped in reverse order, like weron's Open/Wait/Close.
 */
export interface AgentService {
  readonly name: string
  start(signal: AbortSignal): Promise<void>
  stop(): Promise<void>
  /** Control API methods this service answers, by method name (e.g. 'peers', 'vm.run'). */
  handlers(): Record<string, Handler>
  /** A JSON-able summary merged into `mesh status`. */
  status?(): Record<string, unknown>
}
