/**
 * What a move out is given: the caller's parts (network, host, VM, cache, throttle), the user's options
 * (deadline, pause bound, mode) and the tuning with its defaults. The session is source.ts.
 */
import type { Logger } from '../../src/base/log.ts'
import type { Vm } from '../driver/interfaces.ts'
import type { ThrottleProvider } from '../throttle/interfaces.ts'
import type { Conversation } from './conversation.ts'
import type { MigrationNetwork, MigrationProgress, RamCache, VmHost } from './interfaces.ts'
import type { SourceState, Transition } from './state.ts'
import type { MoveOptions } from './v1/messages.ts'

export interface MigrationTuning {
  /** Chunk size of dirty tracking and of the destination's cache (default 64 KiB). */
  chunkSize?: number
  /** Deflate page data (default true). */
  compress?: boolean
  /** Pre-copy rounds after the bulk copy, at most (default 8). */
  maxRounds?: number
  /** Switch over once a round's dirty set is at most this many bytes (default 1 MiB). */
  switchBytes?: number
  /** Every wait for the peer (default 30 s). */
  timeoutMs?: number
  /** After commit, how long the source tries to learn whether the destination resumed (default 60 s). */
  inDoubtMs?: number
  /** How long after the move the source starts keeping the old RAM as chunks (default 2 s). */
  rememberDelayMs?: number
  /** While the guest is paused: ping the destination this often (default 200 ms; 0 = no probing)... */
  probeIntervalMs?: number
  /** ...and call it dead after this long without an answer (default 1500 ms, at least 4 RTTs). */
  deadAfterMs?: number
  /** Post-copy: how long the source waits for a destination whose link broke to come back (10 min). */
  postcopyResumeMs?: number
}

/** The pause bound a --deadline brings when --max-pause is not given. */
export const DEFAULT_MAX_PAUSE_MS = 1000

export interface SourceInit {
  network: MigrationNetwork
  /** The service routes this session's messages to the conversation it registers. */
  register(sid: string, conv: Conversation): () => void
  host: VmHost
  cache?: RamCache
  log: Logger
  vm: Vm
  to: string
  deadlineMs?: number
  /** --max-pause, --best-effort, --mode (see MoveOptions). */
  maxPauseMs?: number
  bestEffort?: boolean
  mode?: MoveOptions['mode']
  /** Slows the guest's vCPUs while pre-copy catches up (absent: never throttled). */
  throttle?: ThrottleProvider
  /**
   * Post-copy across a link cut: resolves when the destination comes back for this VM and token on a
   * new session ('pcresume'), with that session and the owed bitmap it sent. Provided by the service.
   */
  awaitPostcopyResume?: (
    vm: string,
    token: number,
    signal?: AbortSignal,
  ) => Promise<{ conv: Conversation; bitmap: Uint8Array }>
  tuning?: MigrationTuning
  onProgress?: (p: MigrationProgress) => void
  /** Work that goes on after the move (keeping RAM chunks); the service waits for it on stop. */
  background?: (p: Promise<unknown>) => void
  /** Every state change of the session (service status, tests). */
  onState?: (t: Transition<SourceState>) => void
  /** A member's name for messages (default: its PeerId). */
  nameOf?: (peer: string) => string
  signal?: AbortSignal
}

export const SOURCE_DEFAULTS: Required<MigrationTuning> = {
  chunkSize: 64 * 1024,
  compress: true,
  maxRounds: 8,
  switchBytes: 1024 * 1024,
  timeoutMs: 30_000,
  inDoubtMs: 60_000,
  rememberDelayMs: 2000,
  probeIntervalMs: 200,
  deadAfterMs: 1500,
  postcopyResumeMs: 600_000,
}
