/**
 * TCP congestion control on the control plane's own sockets (every libp2p TCP connection: dialled,
 * accepted, hole-punched; the bulk channels ride them). Many cloud images default to cubic, which
 * collapses under the loss of a long path (measured here at 31 ms and 0.05% loss: cubic 3.6 MB/s, bbr
 * 61 MB/s, one stream each); BBR holds. Node has no setsockopt, so TCP_CONGESTION is set through libc
 * with koffi (an FFI whose binary ships in its npm platform package, no install script), on the file
 * descriptor libp2p's TCP socket holds. Changing the algorithm of an open connection is allowed.
 *
 * Whatever fails (no koffi binary for this platform, module not loaded: ENOENT, not in
 * net.ipv4.tcp_allowed_congestion_control for an unprivileged process: EPERM) is counted and reported
 * once, never fatal: the socket keeps the kernel's default, which `status()` names.
 */
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import type { Connection } from '@libp2p/interface'
import { describeError } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'

const IPPROTO_TCP = 6
const TCP_CONGESTION = 13
const ERRNO: Record<number, string> = {
  1: 'EPERM (not in net.ipv4.tcp_allowed_congestion_control)',
  2: 'ENOENT (algorithm not available: module not loaded)',
  9: 'EBADF',
  22: 'EINVAL',
}

export interface CongestionStatus {
  /** What the node asks for (undefined: leave the kernel's default). */
  readonly wanted: string | undefined
  /** The kernel's default for new sockets in this namespace. */
  readonly kernelDefault: string | undefined
  /** Algorithms this namespace has. */
  readonly available: readonly string[]
  readonly applied: number
  readonly failed: number
  readonly lastError?: string
}

export interface CongestionControl {
  /** Sets the wanted algorithm on a new connection's socket (no-op for relayed connections). */
  apply(conn: Connection): void
  /** The algorithm a connection's socket uses now (undefined if it has no socket or cannot be read). */
  current(conn: Connection): string | undefined
  status(): CongestionStatus
}

interface SockOps {
  set(fd: number, algorithm: string): number
  get(fd: number): string | undefined
}

let ops: SockOps | Error | undefined

function sockOps(): SockOps | Error {
  if (ops !== undefined) return ops
  try {
    const koffi = createRequire(import.meta.url)('koffi') as {
      load(name: string): { func(decl: string): (...args: unknown[]) => number }
      errno(): number
    }
    const libc = koffi.load('libc.so.6')
    const setsockopt = libc.func('int setsockopt(int, int, int, const char *, uint32_t)')
    const getsockopt = libc.func('int getsockopt(int, int, int, _Out_ uint8_t *, _Inout_ uint32_t *)')
    ops = {
      set(fd, algorithm) {
        const rc = setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, algorithm, Buffer.byteLength(algorithm))
        return rc === 0 ? 0 : koffi.errno()
      },
      get(fd) {
        const buf = Buffer.alloc(16)
        const len = [16]
        if (getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, buf, len) !== 0) return undefined
        return buf.toString('latin1', 0, len[0]).replace(/\0.*$/s, '')
      },
    }
  } catch (err) {
    ops = new Error(`no FFI for setsockopt (koffi): ${describeError(err)}`)
  }
  return ops
}

/** The socket's file descriptor behind a libp2p TCP connection (internals: libp2p has no API). */
export function socketFd(conn: Connection): number | undefined {
  const fd = (conn as unknown as { maConn?: { socket?: { _handle?: { fd?: unknown } } } }).maConn?.socket
    ?._handle?.fd
  return typeof fd === 'number' && fd >= 0 ? fd : undefined
}

function readSysctl(name: string): string | undefined {
  try {
    return readFileSync(`/proc/sys/net/ipv4/${name}`, 'utf8').trim()
  } catch {
    return undefined
  }
}

export function createCongestionControl(init: {
  /** Algorithm to set (default 'bbr'); false: leave the kernel's default. */
  algorithm?: string | false
  log: Logger
}): CongestionControl {
  const wanted = init.algorithm === false ? undefined : (init.algorithm ?? 'bbr')
  let applied = 0
  let failed = 0
  let lastError: string | undefined
  const fail = (why: string) => {
    failed++
    if (lastError === undefined)
      init.log.warn(
        `cannot set TCP congestion control '${wanted}': ${why}; sockets keep the default (${readSysctl('tcp_congestion_control') ?? '?'})`,
      )
    lastError = why
  }
  return {
    apply(conn) {
      if (wanted === undefined) return
      const fd = socketFd(conn)
      if (fd === undefined) return // relayed, or not a TCP socket
      const o = sockOps()
      if (o instanceof Error) return fail(o.message)
      const errno = o.set(fd, wanted)
      if (errno === 0) applied++
      else fail(ERRNO[errno] ?? `errno ${errno}`)
    },
    current(conn) {
      const fd = socketFd(conn)
      const o = sockOps()
      if (fd === undefined || o instanceof Error) return undefined
      return o.get(fd)
    },
    status() {
      return {
        wanted,
        kernelDefault: readSysctl('tcp_congestion_control'),
        available: (readSysctl('tcp_available_congestion_control') ?? '').split(/\s+/).filter(Boolean),
        applied,
        failed,
        ...(lastError === undefined ? {} : { lastError }),
      }
    },
  }
}
