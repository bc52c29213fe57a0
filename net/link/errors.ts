import { MeshError } from '../../src/base/errors.ts'

export class LinkError extends MeshError {}

/** send() or onDrain() on a channel that has closed. */
export class ChannelClosedError extends LinkError {
  constructor(message = 'channel is closed', options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CHANNEL_CLOSED' })
  }
}

/** A message larger than the channel can carry. */
export class MessageTooLargeError extends LinkError {
  constructor(size: number, max: number) {
    super(`message of ${size} bytes exceeds the channel limit of ${max} bytes`, { code: 'E_MSG_TOO_LARGE' })
  }
}
