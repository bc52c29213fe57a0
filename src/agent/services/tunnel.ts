/**
 * The tunnel as an agent service: the switch, the optional host TAP port, and `mesh expose` ingress.
 * Control API methods: `expose` ({ vm, port, listen }), `unexpose` ({ listen }), `expose.list`,
 * `tunnel.status`. The migration service uses `service.switch` in-process (detachVm/attachVm/announce).
 */
import { connect, createServer, isIPv4, type Server, type Socket } from 'node:net'
import type { Overlay } from '../../../net/link/interfaces.ts'
import { ExposeError } from '../../../net/tunnel/errors.ts'
import type { TunnelSwitch } from '../../../net/tunnel/interfaces.ts'
import { createSwitch, type SwitchOptions } from '../../../net/tunnel/switch.ts'
import { createTapPort, type TapPort } from '../../../net/tunnel/tap-port.ts'
import type { Logger } from '../../base/log.ts'
import type { ControlHandlers } from '../../control/api.ts'
import type { AgentService } from '../interfaces.ts'

export interface TunnelServiceInit {
  overlay: Overlay
  log: Logger
  /** Host TAP port (`mesh join --tap NAME --address CIDR`). */
  tap?: { name: string; address: string; netns?: string }
  /** Resolves a VM name to its guest IPv4 address (the VM manager knows); IPv4 literals always work. */
  resolveVm?: (vm: string) => Promise<string | undefined> | string | undefined
  switchOptions?: Partial<Omit<SwitchOptions, 'overlay' | 'log'>>
  /**
   * Tests only: allow `expose` without a TAP port (the target is then reached through whatever route
   * the host has, e.g. a local server), to test the proxy without root.
   */
  exposeWithoutTap?: boolean
}

export interface ExposeParams {
  vm: string
  port: number
  /** `ADDR:PORT` to accept TCP connections on (port 0: any free port). */
  listen: string
}

export interface ExposeInfo {
  vm: string
  target: string
  port: number
  listen: string
  connections: number
  total: number
}

export interface TunnelService extends AgentService {
  handlers(): ControlHandlers<'expose' | 'unexpose' | 'expose.list' | 'tunnel.status'>
  readonly switch: TunnelSwitch
  expose(params: ExposeParams): Promise<ExposeInfo>
  unexpose(listen: string): Promise<boolean>
  status(): Record<string, unknown>
}

interface Exposure {
  info: ExposeInfo
  server: Server
  sockets: Set<Socket>
}

export function parseHostPort(s: string, what: string): { host: string; port: number } {
  const i = s.lastIndexOf(':')
  const host = i < 0 ? '' : s.slice(0, i).replace(/^\[(.*)\]$/, '$1')
  const port = Number(i < 0 ? s : s.slice(i + 1))
  if (host === '' || !Number.isInteger(port) || port < 0 || port > 65535)
    throw new ExposeError(`${what} must be ADDR:PORT, got '${s}'`)
  return { host, port }
}

function checkParams(p: unknown): ExposeParams {
  const o = (p ?? {}) as Record<string, unknown>
  if (typeof o.vm !== 'string' || o.vm === '') throw new ExposeError('expose: vm is required')
  if (typeof o.port !== 'number' || !Number.isInteger(o.port) || o.port < 1 || o.port > 65535)
    throw new ExposeError('expose: port must be 1-65535')
  if (typeof o.listen !== 'string') throw new ExposeError('expose: listen must be ADDR:PORT')
  return { vm: o.vm, port: o.port, listen: o.listen }
}

export function createTunnelService(init: TunnelServiceInit): TunnelService {
  const log = init.log
  const sw = createSwitch({ overlay: init.overlay, log: log.child('switch'), ...init.switchOptions })
  let tap: TapPort | undefined
  let removeTap: (() => Promise<void>) | undefined
  const exposures = new Map<string, Exposure>()

  async function resolve(vm: string): Promise<string> {
    if (isIPv4(vm)) return vm
    const ip = await init.resolveVm?.(vm)
    if (ip === undefined)
      throw new ExposeError(
        `no member runs a VM named '${vm}' with an IPv4 address in its spec (give its name or guest IPv4 address; see 'mesh vm ls --all')`,
      )
    return ip.split('/')[0]!
  }

  async function expose(params: ExposeParams): Promise<ExposeInfo> {
    if (tap === undefined && init.exposeWithoutTap !== true)
      throw new ExposeError('expose needs the host TAP port: start the agent with --tap NAME --address CIDR')
    const target = await resolve(params.vm)
    const { host, port } = parseHostPort(params.listen, '--listen')
    const sockets = new Set<Socket>()
    const info: ExposeInfo = {
      vm: params.vm,
      target,
      port: params.port,
      listen: params.listen,
      connections: 0,
      total: 0,
    }
    // allowHalfOpen: a client's half-close must reach the guest (and back) unchanged.
    const server = createServer({ allowHalfOpen: true }, (client) => {
      const guest = connect({ host: target, port: params.port, allowHalfOpen: true })
      sockets.add(client)
      sockets.add(guest)
      info.connections++
      info.total++
      client.setNoDelay(true)
      guest.setNoDelay(true)
      client.pipe(guest)
      guest.pipe(client)
      let done = false
      const end = () => {
        if (done) return
        done = true
        info.connections--
        client.destroy()
        guest.destroy()
        sockets.delete(client)
        sockets.delete(guest)
      }
      client.on('error', end)
      guest.on('error', end)
      client.on('close', end)
      guest.on('close', end)
    })
    await new Promise<void>((res, rej) => {
      server.once('error', (err) =>
        rej(new ExposeError(`cannot listen on ${params.listen}: ${err.message}`, { cause: err })),
      )
      server.listen(port, host, () => res())
    })
    const addr = server.address()
    const listen = typeof addr === 'object' && addr !== null ? `${addr.address}:${addr.port}` : params.listen
    if (exposures.has(listen)) {
      server.close()
      throw new ExposeError(`${listen} is already exposed`)
    }
    info.listen = listen
    exposures.set(listen, { info, server, sockets })
    log.info('exposed', { vm: params.vm, target: `${target}:${params.port}`, listen })
    return { ...info }
  }

  async function unexpose(listen: string): Promise<boolean> {
    const e = exposures.get(listen)
    if (e === undefined) return false
    exposures.delete(listen)
    for (const s of e.sockets) s.destroy()
    await new Promise<void>((r) => e.server.close(() => r()))
    return true
  }

  const handlers = {
    expose: async (p) => expose(checkParams(p)),
    unexpose: async (p) => {
      const listen = (p as { listen?: unknown } | null)?.listen
      if (typeof listen !== 'string') throw new ExposeError('unexpose: listen is required')
      return { removed: await unexpose(listen) }
    },
    'expose.list': async () => [...exposures.values()].map((e) => ({ ...e.info })),
    'tunnel.status': async () => sw.status(),
  } satisfies ControlHandlers<'expose' | 'unexpose' | 'expose.list' | 'tunnel.status'>

  return {
    name: 'tunnel',
    switch: sw,
    expose,
    unexpose,
    async start() {
      sw.start()
      if (init.tap !== undefined) {
        let recv: (f: Uint8Array) => void = () => {}
        tap = await createTapPort({
          name: init.tap.name,
          address: init.tap.address,
          netns: init.tap.netns,
          log: log.child('tap'),
          receive: (f) => recv(f),
        })
        const t = tap
        removeTap = sw.addPort('tap', 'tap', (r) => {
          recv = r
          return t
        })
      }
    },
    async stop() {
      for (const l of [...exposures.keys()]) await unexpose(l)
      await removeTap?.()
      tap = undefined
      await sw.stop()
    },
    handlers: () => handlers,
    status() {
      const st = sw.status()
      return {
        mtu: st.mtu,
        macs: st.macs,
        movedAway: st.movedAway,
        held: st.held,
        heldTotal: st.heldTotal,
        ports: st.ports,
        drops: st.drops,
        exposed: [...exposures.values()].map((e) => ({ ...e.info })),
      }
    },
  }
}
