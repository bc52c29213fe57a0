import { MeshError } from '../../src/base/errors.ts'

export class MembershipError extends MeshError {}

/** The invite string cannot be parsed (truncated, wrong prefix, bad fields, too long). */
export class InviteMalformedError extends MembershipError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(`invalid invite: ${message}`, { ...options, code: 'E_INVITE_MALFORMED' })
  }
}

/** The invite's signature does not verify with the network key, or its id does not match its key. */
export class InviteForgedError extends MembershipError {
  constructor(message = 'invite signature does not verify with the network key') {
    super(message, { code: 'E_INVITE_FORGED' })
  }
}

/** The invite is for another network than the member's. */
export class InviteWrongNetworkError extends MembershipError {
  constructor(message = 'invite is for a different network') {
    super(message, { code: 'E_INVITE_WRONG_NETWORK' })
  }
}

export class InviteExpiredError extends MembershipError {
  constructor(expiresAt: number) {
    super(`invite expired at ${new Date(expiresAt).toISOString()}; ask a member for a new one`, {
      code: 'E_INVITE_EXPIRED',
    })
  }
}

/** The invite is bound to another PeerId. */
export class InviteBoundError extends MembershipError {
  constructor(boundPeer: string, presenter: string) {
    super(`invite is bound to ${boundPeer}, presented by ${presenter}`, { code: 'E_INVITE_BOUND' })
  }
}

/** The invite's single-use nonce already admitted another peer. */
export class InviteUsedError extends MembershipError {
  constructor(by: string) {
    super(`invite was already used by ${by}`, { code: 'E_INVITE_USED' })
  }
}

/** The peer has been revoked; no invite readmits it. */
export class PeerRevokedError extends MembershipError {
  constructor(peer: string) {
    super(`peer ${peer} has been revoked from this network`, { code: 'E_PEER_REVOKED' })
  }
}

/** A stream or request came from a peer that is not a current member. */
export class NotMemberError extends MembershipError {
  constructor(peer: string) {
    super(`peer ${peer} is not a member of this network`, { code: 'E_NOT_MEMBER' })
  }
}

/** A replicated record (member entry / revocation) is malformed or its signature is wrong. */
export class RecordInvalidError extends MembershipError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(`invalid membership record: ${message}`, { ...options, code: 'E_RECORD_INVALID' })
  }
}

/** The network key file is missing, malformed or not private. */
export class NetworkKeyError extends MembershipError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_NETWORK_KEY' })
  }
}

/** Admission was refused by the member (the message carries the member's reason). */
export class AdmissionRefusedError extends MembershipError {
  constructor(reason: string, options: { cause?: unknown; code?: string } = {}) {
    super(`admission refused: ${reason}`, {
      cause: options.cause,
      code: options.code ?? 'E_ADMISSION_REFUSED',
    })
  }
}
