import { MeshError } from '../../src/base/errors.ts'

export class ControlError extends MeshError {}

/** A length prefix announced more bytes than the protocol allows: the peer is broken or hostile. */
export class FrameTooLargeError extends ControlError {
  constructor(size: number, max: number) {
    super(`frame of ${size} bytes exceeds the limit of ${max} bytes`, { code: 'E_FRAME_TOO_LARGE' })
  }
}

/** A frame that parsed but is not a valid protocol message. */
export class ProtocolMessageError extends ControlError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(`bad protocol message: ${message}`, { ...options, code: 'E_PROTOCOL_MESSAGE' })
  }
}

/** The stream ended or was reset before the expected message arrived. */
export class StreamEndedError extends ControlError {
  constructor(message = 'stream ended before a complete message', options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_STREAM_ENDED' })
  }
}

/** No response within the protocol's deadline. */
export class ControlTimeoutError extends ControlError {
  constructor(what: string) {
    super(`timed out: ${what}`, { code: 'E_CONTROL_TIMEOUT' })
  }
}
