import { type Command, Option } from 'commander'
import { DEFAULT_LINK_ENGINE, LINK_ENGINES, type LinkEngine } from '../../net/webrtc/engines.ts'
import type { AgentOptions } from '../agent/run.ts'
import { parseSpotSource } from '../agent/spot/notice.ts'
import { parseCapacity, parseLabel, type SpotOptions } from '../agent/spot/options.ts'
import { UsageError } from '../base/errors.ts'
import { DEFAULT_METRICS_ADDR, DEFAULT_WEB_ADDR } from '../config.ts'
import { applyAgentConfig } from '../config-file.ts'
import { resolveState, stateOption } from './common.ts'

const collect = (v: string, prev: string[] | undefined) => [...(prev ?? []), v]

/** Options shared by `mesh join` and `mesh agent`: both run the agent in the foreground. */
export function addAgentOptions(cmd: Command): Command {
  return cmd
    .option(
      '--config <file>',
      'JSON config file with any of these options (env MESH_CONFIG; default /etc/mesh/agent.json as root); ' +
        'flags win over MESH_* environment variables, which win over the file',
    )
    .hook('preAction', (_self, action) => applyAgentConfig(action))
    .addOption(stateOption())
    .option('--name <name>', "this member's name (default: the host name)")
    .option('--listen <multiaddr>', 'libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/0)', collect)
    .option(
      '--announce <multiaddr>',
      'address to advertise instead of the listen addresses (repeatable)',
      collect,
    )
    .option('--bootstrap', 'also serve circuit relay and STUN for other members', false)
    .addOption(
      new Option('--stun-port <port>', 'UDP and TCP port of the STUN responder (with --bootstrap)').argParser(
        Number,
      ),
    )
    .option('--ice <url>', 'extra ICE server, stun:HOST:PORT or turn:HOST:PORT (repeatable)', collect)
    .option('--turn-credentials <file>', "file (mode 0600) holding 'user:password' for the TURN servers")
    .addOption(
      new Option('--engine <engine>', 'WebRTC implementation of the links')
        .choices([...LINK_ENGINES])
        .default(DEFAULT_LINK_ENGINE),
    )
    .option('--tap <name>', 'host TAP interface into the guest network (needs root and --address)')
    .option('--address <cidr>', "this host's address on the guest network, with --tap (e.g. 10.99.0.1/24)")
    .option('--pnet', 'add a libp2p pre-shared key derived from the network (all members must agree)', false)
    .option(
      '--metrics [addr:port]',
      `serve Prometheus metrics on GET /metrics (default address ${DEFAULT_METRICS_ADDR}: loopback only)`,
    )
    .option(
      '--web [addr:port]',
      `serve the live web view, token-protected ('mesh web' prints its URL; default address ${DEFAULT_WEB_ADDR})`,
    )
    .option(
      '--no-direct',
      'keep bulk traffic (chunks, migration) on the WebRTC link even when a TCP path to a member exists',
    )
    .option(
      '--no-relay-bulk',
      "keep bulk traffic on the WebRTC link when only the bootstrap's TCP relay would carry it",
    )
    .option(
      '--tcp-congestion <algorithm>',
      "TCP congestion control of the agent's sockets ('default': the kernel's)",
      'bbr',
    )
    .option(
      '--warm-links <n>',
      'members (ring neighbours) to keep a link to at all times; links to the others are built on demand and closed when idle (default 8: up to 9 members, a full mesh)',
    )
    .option(
      '--spot <source>',
      'watch for spot notices and evacuate on one: aws (IMDSv2), gcp, azure (Scheduled Events), url:URL or file:PATH',
    )
    .option(
      '--spot-poll <duration>',
      'poll interval of the notice watcher (default: 5s aws, 1s azure/url/file)',
    )
    .option('--spot-window <duration>', "notice length when the provider gives no time (default 30s, GCP's)")
    .option(
      '--spot-margin <duration>',
      "finish evacuating this long before a notice's deadline (default max(3s, 10%))",
    )
    .addOption(
      new Option('--spot-rebalance <policy>', 'on an AWS rebalance recommendation').choices([
        'report',
        'evacuate',
      ]),
    )
    .option(
      '--label <key=value>',
      'a label members see, for placement: provider=gcp, price=0.012 (per hour), region=… (repeatable)',
      collect,
    )
    .option(
      '--capacity <room>',
      'room this host offers to VMs, e.g. ram=8G,cpus=8,disk=100G (default: its RAM less 1 GiB, 4 vCPUs per core)',
    )
}

export interface AgentCliOptions {
  state?: string
  name?: string
  listen?: string[]
  announce?: string[]
  bootstrap: boolean
  stunPort?: number
  ice?: string[]
  turnCredentials?: string
  pnet: boolean
  tap?: string
  address?: string
  engine: LinkEngine
  /** commander's negation of --no-direct: true unless it was given. */
  direct: boolean
  relayBulk: boolean
  tcpCongestion: string
  warmLinks?: string
  /** true: given without a value. */
  metrics?: string | true
  web?: string | true
  spot?: string
  spotPoll?: string
  spotWindow?: string
  spotMargin?: string
  spotRebalance?: 'report' | 'evacuate'
  label?: string[]
  capacity?: string
}

function duration(v: string | undefined, what: string, minMs: number): number | undefined {
  if (v === undefined) return undefined
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(v.trim())
  const ms = m === null ? Number.NaN : Number(m[1]) * (m[2] === 'ms' ? 1 : m[2] === 'm' ? 60_000 : 1000)
  if (!Number.isFinite(ms) || ms < minMs)
    throw new UsageError(`${what} '${v}' must be a duration like 5s, 500ms or 2m`)
  return Math.round(ms)
}

function spotOptions(o: AgentCliOptions): SpotOptions {
  const labels: Record<string, string> = {}
  for (const l of o.label ?? []) {
    const [k, v] = parseLabel(l)
    labels[k] = v
  }
  const pollMs = duration(o.spotPoll, '--spot-poll', 10)
  const windowMs = duration(o.spotWindow, '--spot-window', 1000)
  const marginMs = duration(o.spotMargin, '--spot-margin', 0)
  return {
    labels,
    ...(o.spot === undefined ? {} : { source: parseSpotSource(o.spot) }),
    ...(pollMs === undefined ? {} : { pollMs }),
    ...(windowMs === undefined ? {} : { windowMs }),
    ...(marginMs === undefined ? {} : { marginMs }),
    ...(o.spotRebalance === undefined ? {} : { onRebalance: o.spotRebalance }),
    ...(o.capacity === undefined ? {} : { offered: parseCapacity(o.capacity) }),
  }
}

export function toAgentOptions(o: AgentCliOptions, invite?: string): AgentOptions {
  if (!LINK_ENGINES.includes(o.engine))
    throw new UsageError(`engine '${o.engine}' is not one of ${LINK_ENGINES.join(', ')}`)
  if ((o.tap === undefined) !== (o.address === undefined))
    throw new UsageError('--tap and --address go together')
  if (!/^[a-z0-9_]{1,15}$/.test(o.tcpCongestion))
    throw new UsageError(
      `--tcp-congestion '${o.tcpCongestion}' is not an algorithm name (bbr, cubic, default)`,
    )
  const warmLinks = o.warmLinks === undefined ? undefined : Number(o.warmLinks)
  if (warmLinks !== undefined && !(Number.isInteger(warmLinks) && warmLinks >= 0 && warmLinks <= 100_000))
    throw new UsageError(`--warm-links '${o.warmLinks}' must be a whole number (0 or more)`)
  if (o.address !== undefined && !/^\d{1,3}(\.\d{1,3}){3}\/\d{1,2}$/.test(o.address)) {
    throw new UsageError(`--address '${o.address}' must be an IPv4 CIDR like 10.99.0.1/24`)
  }
  return {
    ...(o.tap === undefined || o.address === undefined ? {} : { tap: { name: o.tap, address: o.address } }),
    state: resolveState(o),
    ...(o.name === undefined ? {} : { name: o.name }),
    ...(o.listen === undefined ? {} : { listen: o.listen }),
    ...(o.announce === undefined ? {} : { announce: o.announce }),
    bootstrap: o.bootstrap,
    ...(o.stunPort === undefined ? {} : { stunPort: o.stunPort }),
    ...(o.ice === undefined ? {} : { ice: o.ice }),
    ...(o.turnCredentials === undefined ? {} : { turnCredentials: o.turnCredentials }),
    pnet: o.pnet,
    engine: o.engine,
    direct: o.direct,
    relayBulk: o.relayBulk,
    tcpCongestion: o.tcpCongestion === 'default' ? false : o.tcpCongestion,
    ...(warmLinks === undefined ? {} : { warmLinks }),
    ...(o.metrics === undefined ? {} : { metrics: o.metrics === true ? DEFAULT_METRICS_ADDR : o.metrics }),
    ...(o.web === undefined ? {} : { web: o.web === true ? DEFAULT_WEB_ADDR : o.web }),
    spot: spotOptions(o),
    ...(invite === undefined ? {} : { invite }),
  }
}
