/**
 * Direct path, version 1: the first frame of every `/mesh/direct/1` libp2p stream, and the marker that
 * moves a switchable channel from the WebRTC link to it.
 *
 * Switch header (9 bytes), the first message each side sends on a direct stream once it moves there:
 * u8 version (1) · u64 count of messages it sent on the WebRTC path before. The receiver delivers exactly
 * that many from the WebRTC path, then the direct stream: the order survives the move with no marker
 * in the old path (any message, even an empty one, stays an application message there).
 *
 * Hello (18 bytes): u8 version (1) · u8 channel id (a reliable bulk channel) · 16-byte token. The token
 * was offered on the pair's signaling stream and names the link attempt the stream belongs to; a stream
 * whose hello does not decode, or whose token nobody expects from that peer, is reset.
 */
import { LinkError } from '../../errors.ts'
import { CHANNELS, type ChannelName } from '../../interfaces.ts'

export const DIRECT_PROTOCOL = '/mesh/direct/1'
export const DIRECT_VERSION = 1
export const TOKEN_BYTES = 16
export const HELLO_BYTES = 2 + TOKEN_BYTES

/** Channels that may move to the direct path: reliable, ordered bulk traffic. `control` stays on the
 *  WebRTC link (it carries the liveness everyone relies on) and `tunnel` must never retransmit. */
export const DIRECT_CHANNELS: readonly ChannelName[] = ['chunks', 'migrate']

export class DirectDecodeError extends LinkError {
  constructor(message: string) {
    super(`direct path: ${message}`, { code: 'E_DIRECT_DECODE' })
  }
}

export interface Hello {
  readonly channel: ChannelName
  readonly token: Uint8Array
}

export function encodeHello(hello: Hello): Uint8Array {
  if (!DIRECT_CHANNELS.includes(hello.channel))
    throw new DirectDecodeError(`channel '${hello.channel}' cannot go direct`)
  if (hello.token.byteLength !== TOKEN_BYTES)
    throw new DirectDecodeError(`token must be ${TOKEN_BYTES} bytes`)
  const out = new Uint8Array(HELLO_BYTES)
  out[0] = DIRECT_VERSION
  out[1] = CHANNELS[hello.channel].id
  out.set(hello.token, 2)
  return out
}

export function decodeHello(bytes: Uint8Array): Hello {
  if (bytes.byteLength !== HELLO_BYTES)
    throw new DirectDecodeError(`hello of ${bytes.byteLength} bytes, want ${HELLO_BYTES}`)
  if (bytes[0] !== DIRECT_VERSION) throw new DirectDecodeError(`unsupported version ${bytes[0]}`)
  const channel = DIRECT_CHANNELS.find((c) => CHANNELS[c].id === bytes[1])
  if (channel === undefined) throw new DirectDecodeError(`channel id ${bytes[1]} cannot go direct`)
  return { channel, token: bytes.slice(2) }
}

export const SWITCH_BYTES = 9

export function encodeSwitch(sentBefore: number): Uint8Array {
  if (!Number.isSafeInteger(sentBefore) || sentBefore < 0)
    throw new DirectDecodeError(`bad count ${sentBefore}`)
  const out = new Uint8Array(SWITCH_BYTES)
  out[0] = DIRECT_VERSION
  new DataView(out.buffer).setBigUint64(1, BigInt(sentBefore))
  return out
}

/** The count of messages the peer sent on the WebRTC path before its switch. */
export function decodeSwitch(bytes: Uint8Array): number {
  if (bytes.byteLength !== SWITCH_BYTES)
    throw new DirectDecodeError(`switch header of ${bytes.byteLength} bytes, want ${SWITCH_BYTES}`)
  if (bytes[0] !== DIRECT_VERSION) throw new DirectDecodeError(`unsupported version ${bytes[0]}`)
  const n = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigUint64(1)
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw new DirectDecodeError('switch count out of range')
  return Number(n)
}
