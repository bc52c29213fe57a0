/**
 * What moves live, as the source's state machine sees it: one SourceStream per kind of guest state that
 * is copied while the guest runs and finished while it is paused (RAM today: ram-sender.ts; disk blocks
 * next). The shape is QEMU's SaveVMHandlers (save_setup / save_live_iterate / state_pending /
 * save_live_complete_precopy): the source runs every stream through the same phases, sums their pending
 * bytes for decideSwitch(), and sends the device state only after every stream's final part.
 *
 * The destination side of a stream is its messages' handler in destination.ts (chunks are applied in
 * stream order; a new stream brings its own message types in v1/messages.ts).
 */
import type { Conversation } from './conversation.ts'
import type { Message, MessageType } from './v1/messages.ts'

/** What a stream may use of the session. */
export interface SourceContext {
  readonly conv: Conversation
  readonly sid: string
  readonly signal: AbortSignal | undefined
  /** Every wait for the peer (tuning.timeoutMs). */
  readonly timeoutMs: number
  /** Progress: a phase of `bytes` starts (bulk: all there is; a round: its dirty set). */
  beginPhase(bytes: number): void
  /** `bytes` of guest state carried: sent, or (deduped) found at the destination instead. */
  carried(bytes: number, deduped?: boolean): void
  /** Records the time since the last lap under `step` (the report's timings). */
  lap(step: string): void
  /** The stream starts putting data on the channel (the link's rate is measured from here). */
  sending?(): void
}

/** What a pass found to send. */
export interface PendingSet {
  /** Bytes of guest state to send (before encoding). */
  bytes: number
  /** Units (chunks, blocks) they make up: the 'round' message counts them. */
  units: number
  /** The rate the guest dirties this state at, bytes/s. */
  rateBytesPerSec: number
  /** What finding the set cost, ms (a further round costs another such pass). */
  scanMs: number
}

export interface SourceStream {
  /** 'ram', 'disk' ... (logs and reports). */
  readonly name: string
  /** Starts tracking changes, then sends the first full pass. Resolves with what the pass covered. */
  bulk(ctx: SourceContext): Promise<{ bytes: number; units: number }>
  /** What changed since the last pass (guest running). */
  pending(ctx: SourceContext): Promise<PendingSet>
  /** Sends what pending() found, as pre-copy round `round`. */
  iterate(round: number, ctx: SourceContext): Promise<void>
  /** Guest paused: finds exactly what is left (runs alongside the device state save). Returns units. */
  finalScan(ctx: SourceContext): Promise<number>
  /** Sends what finalScan() found, as round `round`. */
  sendFinal(round: number, ctx: SourceContext): Promise<void>
  /** Stops tracking and closes files; idempotent. Called before the VM's files go away, and on failure. */
  close(): Promise<void>
}

/** What a destination stream may use of the session. */
export interface DestinationContext {
  readonly conv: Conversation
  readonly sid: string
  readonly signal: AbortSignal | undefined
}

/**
 * The destination side of a SourceStream: handles that stream's message types (in stream order, the
 * only order the source's encoding is valid in) until 'final'. RAM: ram-receiver.ts.
 */
export interface DestinationStream {
  readonly name: string
  /** The message types this stream handles (no two streams share one). */
  readonly types: readonly MessageType[]
  handle(m: Message, ctx: DestinationContext): Promise<void>
  /** The source sent 'final' (every message of this stream is handled); the device state loads next. */
  beforeLoad?(ctx: DestinationContext): Promise<void>
  /** Guest bytes written so far, and how many of them came from the local cache (progress). */
  readonly writtenBytes: number
  readonly cachedBytes: number
  /** Closes files; idempotent. */
  close(): void
}
