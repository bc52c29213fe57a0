import { MeshError } from '../../src/base/errors.ts'

/** Base of every tunnel failure. */
export class TunnelError extends MeshError {}

/** A message on the tunnel channel (or a QEMU stream) that cannot be decoded. */
export class TunnelDecodeError extends TunnelError {
  constructor(message: string) {
    super(message, { code: 'E_TUNNEL_DECODE' })
  }
}

/** A local port (QEMU stream socket, host TAP) could not be set up or failed for good. */
export class TunnelPortError extends TunnelError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_TUNNEL_PORT' })
  }
}

/** `mesh expose` could not be set up (bad target, no TAP port, listen address in use). */
export class ExposeError extends TunnelError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_EXPOSE' })
  }
}
