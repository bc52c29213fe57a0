/**
 * What the WebRTC link needs from the outside: a way to exchange signaling messages with the peer.
 * The transport is not this module's business: in the agent it is an authenticated libp2p stream (which
 * is what binds the DTLS fingerprints in the SDP to the peer's identity); in tests an in-memory pair or a
 * local socket. Messages are objects here; `v1/messages.ts` turns them into bytes and back.
 */
import type { SignalMessage } from './v1/messages.ts'

export type { SignalMessage } from './v1/messages.ts'

export interface Signaling {
  /** Sends one message to the peer. Must not throw for transport errors (drop and let the link time out). */
  send(msg: SignalMessage): void
  /** Adds a handler for messages from the peer; returns a function that removes it. */
  onMessage(handler: (msg: SignalMessage) => void): () => void
}

/** An ICE server as WebRTC knows it (STUN or TURN). */
export interface IceServer {
  urls: string | string[]
  username?: string
  credential?: string
}
