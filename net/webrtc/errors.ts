import { LinkError } from '../link/errors.ts'

/** A signaling message could not be decoded (malformed, wrong version, over a length limit). */
export class SignalDecodeError extends LinkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(`bad signaling message: ${message}`, { ...options, code: 'E_SIGNAL_DECODE' })
  }
}

/** The link could not be established (ICE failed, DTLS/SCTP never came up, timed out, peer said bye). */
export class LinkConnectError extends LinkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_LINK_CONNECT' })
  }
}

/** An established link stopped hearing from its peer (no heartbeat within the dead interval) or its
 *  transport failed. The owner is expected to rebuild the link. */
export class LinkDeadError extends LinkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_LINK_DEAD' })
  }
}

/** The peer closed the link on purpose (sent bye). */
export class LinkClosedByPeerError extends LinkError {
  constructor(message = 'peer closed the link', options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_LINK_CLOSED_BY_PEER' })
  }
}
