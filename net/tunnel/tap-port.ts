/**
 * The host TAP port: lets host processes (and `mesh expose`) reach guests through the host's own
 * TCP/IP stack. Node cannot issue the TUNSETIFF ioctl, and a native addon would need building at
 * install, so `socat` owns the TAP file descriptor and relays it to a loopback UDP socket of ours,
 * one datagram per Ethernet frame (`iff-no-pi`: no packet-info header). Cost: one extra process and two
 * loopback datagram copies per frame (measured in test/bench/tunnel.ts).
 *
 * Only datagrams from socat's own source port are accepted; the socket is bound to 127.0.0.1.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { createSocket, type Socket } from 'node:dgram'
import { promisify } from 'node:util'
import type { Logger } from '../../src/base/log.ts'
import { TunnelPortError } from './errors.ts'
import { TUNNEL_MTU } from './interfaces.ts'

const run = promisify(execFile)

export interface TapOptions {
  /** Interface name (at most 15 characters), e.g. `mesh0`. */
  name: string
  /** Address in CIDR form, e.g. `10.99.0.1/24`. */
  address?: string
  /** Move the interface into this network namespace after creating it (tests). */
  netns?: string
  mtu?: number
  log: Logger
  receive: (frame: Uint8Array) => void
  /** Datagrams in flight to socat before frames are dropped (default 512). */
  maxInFlight?: number
}

export interface TapPort {
  send(frame: Uint8Array): boolean
  connected(): boolean
  close(): Promise<void>
}

/** Socket buffers on both ends of the relay (the kernel caps them at net.core.rmem_max/wmem_max). */
const UDP_BUFFER_BYTES = 4 << 20

async function bindUdp(port = 0): Promise<Socket> {
  const s = createSocket({ type: 'udp4', recvBufferSize: UDP_BUFFER_BYTES, sendBufferSize: UDP_BUFFER_BYTES })
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject)
    s.bind(port, '127.0.0.1', () => {
      s.off('error', reject)
      resolve()
    })
  })
  return s
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

export async function createTapPort(o: TapOptions): Promise<TapPort> {
  if (!/^[A-Za-z0-9_.-]{1,15}$/.test(o.name)) throw new TunnelPortError(`bad TAP interface name '${o.name}'`)
  const maxInFlight = o.maxInFlight ?? 512
  const sock = await bindUdp()
  // A port for socat's side: take a free one from the kernel and hand it over (loopback only).
  const probe = await bindUdp()
  const socatPort = probe.address().port
  await new Promise<void>((r) => probe.close(() => r()))
  const swPort = sock.address().port
  let closed = false
  let stderr = ''
  const proc: ChildProcess = spawn(
    'socat',
    [
      '-b',
      '65536',
      `TUN,tun-type=tap,tun-name=${o.name},iff-no-pi`,
      // socat reads one datagram per turn of its loop while the switch writes a whole burst of frames
      // (everything one SCTP read delivered): at the 208 KiB default its receive buffer overflowed and
      // TCP through the tunnel saw losses (the agent's own socket has 4 MiB; rmem_max caps both).
      `UDP-DATAGRAM:127.0.0.1:${swPort},bind=127.0.0.1:${socatPort},rcvbuf=${UDP_BUFFER_BYTES},sndbuf=${UDP_BUFFER_BYTES}`,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  )
  proc.stderr?.setEncoding('utf8')
  proc.stderr?.on('data', (s: string) => {
    stderr = (stderr + s).slice(-2000)
  })
  let exited = false
  const exitedP = new Promise<void>((resolve) => {
    proc.once('exit', () => {
      exited = true
      resolve()
    })
    proc.once('error', (err) => {
      stderr += String(err)
      exited = true
      resolve()
    })
  })
  const fail = async (msg: string, cause?: unknown): Promise<never> => {
    closed = true
    if (!exited) proc.kill('SIGKILL')
    await exitedP
    sock.close()
    throw new TunnelPortError(`TAP ${o.name}: ${msg}${stderr ? `: ${stderr.trim()}` : ''}`, { cause })
  }
  // Wait for socat to create the device.
  const t0 = Date.now()
  for (;;) {
    if (exited) return fail('socat exited (root and /dev/net/tun are needed)')
    try {
      await run('ip', ['link', 'show', 'dev', o.name])
      break
    } catch {
      if (Date.now() - t0 > 5000) return fail('the interface did not appear within 5 s')
      await sleep(20)
    }
  }
  try {
    const ns = o.netns === undefined ? [] : ['-n', o.netns]
    if (o.netns !== undefined) await run('ip', ['link', 'set', 'dev', o.name, 'netns', o.netns])
    await run('ip', [...ns, 'link', 'set', 'dev', o.name, 'mtu', String(o.mtu ?? TUNNEL_MTU)])
    if (o.address !== undefined) await run('ip', [...ns, 'addr', 'add', o.address, 'dev', o.name])
    await run('ip', [...ns, 'link', 'set', 'dev', o.name, 'up'])
  } catch (err) {
    return fail('configuring the interface failed', err)
  }
  // Connected to socat's port: the kernel then delivers only socat's datagrams, and send() needs no
  // address (no per-frame lookup) and no completion callback (a bounded libuv queue instead).
  try {
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject)
      sock.connect(socatPort, '127.0.0.1', () => {
        sock.off('error', reject)
        resolve()
      })
    })
  } catch (err) {
    return fail('connecting the relay socket failed', err)
  }
  sock.on('message', (msg, rinfo) => {
    if (rinfo.port === socatPort && rinfo.address === '127.0.0.1') o.receive(msg)
  })
  sock.on('error', (err) => o.log.warn('TAP socket error', { error: err }))
  proc.once('exit', (code, signal) => {
    if (!closed) o.log.error('socat for the TAP port exited', { code, signal, stderr: stderr.trim() })
  })
  o.log.info('TAP port up', { name: o.name, address: o.address ?? 'none', netns: o.netns ?? 'host' })
  return {
    send(frame) {
      // Datagrams the kernel did not take at once wait in libuv's queue: bound it.
      if (closed || exited || sock.getSendQueueCount() >= maxInFlight) return false
      sock.send(frame)
      return true
    },
    connected: () => !closed && !exited,
    async close() {
      if (closed) return
      closed = true
      if (!exited) proc.kill('SIGTERM')
      const timer = setTimeout(() => proc.kill('SIGKILL'), 2000)
      await exitedP
      clearTimeout(timer)
      await new Promise<void>((r) => sock.close(() => r()))
    },
  }
}
