import { homedir } from 'node:os'
import { join, resolve } from 'node:path'

/**
 * Where an agent keeps its state: identity, network membership, chunk store, VM records and the
 * control socket. One directory per agent, so several agents can share a machine (tests, the demo).
 */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MESH_STATE !== undefined && env.MESH_STATE !== '') return resolve(env.MESH_STATE)
  if (process.getuid?.() === 0) return '/var/lib/mesh'
  return join(env.XDG_STATE_HOME ?? join(homedir(), '.local', 'state'), 'mesh')
}

export interface StatePaths {
  dir: string
  controlSocket: string
  identity: string
  network: string
  chunks: string
  vms: string
  log: string
}

export function statePaths(dir: string): StatePaths {
  const d = resolve(dir)
  return {
    dir: d,
    controlSocket: join(d, 'control.sock'),
    identity: join(d, 'identity.key'),
    network: join(d, 'network.json'),
    chunks: join(d, 'chunks'),
    vms: join(d, 'vms'),
    log: join(d, 'agent.log'),
  }
}
