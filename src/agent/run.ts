import { existsSync, readFileSync, statSync } from 'node:fs'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { createChunkAgentService } from '../../net/chunks/agent-service.ts'
import type { IceServer } from '../../net/interfaces.ts'
import { loadNetworkKey, type NetworkKey } from '../../net/membership/network.ts'
import { createLocalVmManager, createVmService } from '../../vm/service.ts'
import { statePaths } from '../config.ts'
import { MeshError, UsageError } from '../errors.ts'
import { createLogger, type Logger } from '../log.ts'
import { type Agent, createAgent } from './agent.ts'
import type { AgentService } from './interfaces.ts'
import { createNetService, stunFromBootstrap } from './net-service.ts'

export const NETWORK_KEY_FILE = 'network.key'

export interface AgentOptions {
  state: string
  name?: string
  listen?: string[]
  announce?: string[]
  /** Serve circuit relay and STUN for other members. */
  bootstrap?: boolean
  stunPort?: number
  /** Extra ICE servers: stun:HOST:PORT or turn:HOST:PORT URLs. */
  ice?: string[]
  /** File holding `user:password` for the TURN servers (never on the command line). */
  turnCredentials?: string
  invite?: string
  pnet?: boolean
}

export class AgentConfigError extends MeshError {}

function readTurnCredentials(path: string): { username: string; credential: string } {
  let text: string
  try {
    if ((statSync(path).mode & 0o077) !== 0) {
      throw new AgentConfigError(`${path} is readable by others; chmod 600 it (it holds TURN credentials)`)
    }
    text = readFileSync(path, 'utf8').trim()
  } catch (err) {
    if (err instanceof AgentConfigError) throw err
    throw new AgentConfigError(`cannot read TURN credentials from ${path}: ${(err as Error).message}`, {
      cause: err,
    })
  }
  const i = text.indexOf(':')
  if (i <= 0) throw new AgentConfigError(`${path} must hold 'user:password' on one line`)
  return { username: text.slice(0, i), credential: text.slice(i + 1) }
}

function iceServers(opts: AgentOptions, bootstrapAddrs: string[]): IceServer[] {
  const servers: IceServer[] = stunFromBootstrap(bootstrapAddrs)
  const creds = opts.turnCredentials === undefined ? undefined : readTurnCredentials(opts.turnCredentials)
  for (const url of opts.ice ?? []) {
    if (!/^(stun|turn):[^\s]+$/.test(url)) throw new UsageError(`--ice '${url}' must be a stun: or turn: URL`)
    if (url.startsWith('turn:')) {
      if (creds === undefined) throw new UsageError(`--ice ${url} needs --turn-credentials FILE`)
      servers.push({ urls: url, ...creds })
    } else servers.push({ urls: url })
  }
  return servers
}

/** Bootstrap addresses this node knows: from the invite, or saved in its network state. */
function knownBootstrap(state: string, invite: string | undefined): string[] {
  const out: string[] = []
  if (invite !== undefined) {
    try {
      const b64 = invite.trim().slice('mesh1:'.length).split('.')[0] ?? ''
      const body = JSON.parse(Buffer.from(b64, 'base64url').toString('utf8')) as { bootstrap?: unknown }
      if (Array.isArray(body.bootstrap)) out.push(...body.bootstrap.map(String))
    } catch {
      // A malformed invite is reported by admission itself with a precise error.
    }
  }
  const netFile = join(state, 'network.json')
  if (existsSync(netFile)) {
    try {
      const o = JSON.parse(readFileSync(netFile, 'utf8')) as { bootstrap?: unknown }
      if (Array.isArray(o.bootstrap)) out.push(...o.bootstrap.map(String))
    } catch {
      // Corrupt state is reported by the node when it loads it.
    }
  }
  return out
}

/** Builds the agent for a state dir: the overlay node plus every service hosted next to it. */
export async function buildAgent(opts: AgentOptions, log: Logger = createLogger()): Promise<Agent> {
  const paths = statePaths(opts.state)
  const keyFile = join(paths.dir, NETWORK_KEY_FILE)
  let networkKey: NetworkKey | undefined
  if (existsSync(keyFile)) networkKey = await loadNetworkKey(keyFile)
  if (networkKey === undefined && opts.invite === undefined && !existsSync(join(paths.dir, 'network.json'))) {
    throw new AgentConfigError(
      `${paths.dir} has no network: run 'mesh join INVITE' on a new node, or 'mesh network create NAME' on the first one`,
    )
  }
  const bootstrapRole = opts.bootstrap === true
  const net = createNetService({
    stateDir: paths.dir,
    name:
      opts.name ??
      hostname()
        .replace(/[^A-Za-z0-9._-]/g, '-')
        .slice(0, 63),
    listen: opts.listen ?? [bootstrapRole ? '/ip4/0.0.0.0/tcp/4001' : '/ip4/0.0.0.0/tcp/0'],
    ...(opts.announce === undefined ? {} : { announce: opts.announce }),
    ...(bootstrapRole ? { bootstrapRole: { relay: true } } : {}),
    ...(bootstrapRole ? { stunPort: opts.stunPort ?? 3478 } : {}),
    ...(networkKey === undefined ? {} : { networkKey }),
    ...(opts.invite === undefined ? {} : { invite: opts.invite }),
    iceServers: iceServers(opts, knownBootstrap(paths.dir, opts.invite)),
    pnet: opts.pnet ?? false,
    log: log.child('net'),
  })
  const vmLog = log.child('vm')
  const vms = createVmService({ manager: createLocalVmManager(paths.dir), log: (m, f) => vmLog.warn(m, f) })
  const chunks = createChunkAgentService({
    stateDir: paths.dir,
    overlay: () => net.node.overlay,
    log: log.child('chunks'),
  })
  const services: AgentService[] = [net, chunks, vms]
  return createAgent({ stateDir: paths.dir, services, log })
}

/** Runs an agent in the foreground until SIGINT/SIGTERM or `agent.stop`. */
export async function runAgent(opts: AgentOptions): Promise<void> {
  const log = createLogger()
  const agent = await buildAgent(opts, log)
  const stop = () => {
    log.info('stopping (signal)')
    void agent.stop()
  }
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
  try {
    await agent.start()
    await agent.wait()
  } finally {
    process.off('SIGINT', stop)
    process.off('SIGTERM', stop)
  }
}
