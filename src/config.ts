import { isIP } from 'node:net'
import { homedir } from 'node:os'
import { join, resolve } from 'node:path'
import { UsageError } from './base/errors.ts'

/**
 * Where an agent keeps its state: identity, network membership, chunk store, VM records and the
 * control socket. One directory per agent, so several agents can share a machine (tests, the demo).
 */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MESH_STATE !== undefined && env.MESH_STATE !== '') return resolve(env.MESH_STATE)
  if (process.getuid?.() === 0) return '/var/lib/mesh'
  return join(env.XDG_STATE_HOME ?? join(homedir(), '.local', 'state'), 'mesh')
}

/** Where `--metrics` and `--web` listen when given without an address: loopback only. */
export const DEFAULT_METRICS_ADDR = '127.0.0.1:9464'
export const DEFAULT_WEB_ADDR = '127.0.0.1:9465'

/** The network key's file in a state dir (only on the member that created the network). */
export const NETWORK_KEY_FILE = 'network.key'

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

/** `ADDR:PORT` (IPv6 in brackets) → host and port. */
export function parseListenAddr(s: string, what: string): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d{1,5})$/.exec(s.trim())
  const host = m?.[1]?.replace(/^\[(.*)\]$/, '$1') ?? ''
  const port = Number(m?.[2])
  if (m === null || !Number.isInteger(port) || port > 65535 || (isIP(host) === 0 && host !== 'localhost'))
    throw new UsageError(`${what} must be IP:PORT (e.g. 127.0.0.1:9464), got '${s}'`)
  return { host, port }
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.')
}
