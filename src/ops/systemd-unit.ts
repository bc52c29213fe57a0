/**
 * The systemd unit `mesh service install` writes for the agent. Hardened to what the agent does:
 * - runs as root but keeps only CAP_NET_ADMIN (host TAP via /dev/net/tun and `ip`, socket buffers) and,
 *   when asked to listen on a port below 1024, CAP_NET_BIND_SERVICE; every other capability is dropped
 *   from the bounding set, so neither the agent nor QEMU it starts can regain them;
 * - the file system is read-only but for the state dir, the guests' RAM (/dev/shm) and its runtime dir;
 *   /home is hidden; kernel tunables, modules and logs are off limits;
 * - KillMode=process: QEMU guests outlive an agent restart (the next agent re-adopts them) instead of
 *   dying with it; Restart=on-failure with a short delay brings the agent back;
 * - Delegate=yes gives it a cgroup subtree of its own (CPU limits on guests, cgroup v2).
 */
export interface UnitOptions {
  /** Absolute path of node. */
  node: string
  /** Absolute path of bin/mesh.js. */
  bin: string
  stateDir: string
  configFile: string
  /** Extra capability, e.g. a listen port below 1024. */
  bindLowPorts?: boolean
  description?: string
}

export const UNIT_NAME = 'mesh-agent.service'

const quote = (s: string): string => (/^[\w@%+=:,./-]+$/.test(s) ? s : `"${s.replace(/(["\\$])/g, '\\$1')}"`)

export function renderUnit(o: UnitOptions): string {
  const caps = ['CAP_NET_ADMIN', ...(o.bindLowPorts === true ? ['CAP_NET_BIND_SERVICE'] : [])].join(' ')
  return `# Written by 'mesh service install'. Edit ${o.configFile} (README "Configuration") rather than this file.
[Unit]
Description=${o.description ?? 'mesh agent: private peer-to-peer overlay with live VM migration'}
Documentation=man:systemd.exec(5)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=${quote(o.node)} ${quote(o.bin)} agent --config ${quote(o.configFile)} --state ${quote(o.stateDir)}
Environment=MESH_STATE=${quote(o.stateDir)}
Restart=on-failure
RestartSec=2s
# Guests outlive a restart of the agent, which re-adopts them.
KillMode=process
TimeoutStopSec=30s
LimitNOFILE=65536
Delegate=yes
UMask=0077

CapabilityBoundingSet=${caps}
AmbientCapabilities=${caps}
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=${quote(o.stateDir)} /dev/shm /run/mesh
RuntimeDirectory=mesh
RuntimeDirectoryPreserve=yes
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
`
}
