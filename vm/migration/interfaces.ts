/**
 * What live migration needs from the rest of the system, as small interfaces. Nothing here names
 * libp2p or werift: the overlay reaches migration as `MigrationNetwork` (see overlay.ts for the adapter
 * over net/link's Overlay 'migrate' channel), the runtime as `VmHost`, the chunk store as `RamCache`.
 */
import type { Vm, VmHandle } from '../driver/interfaces.ts'
import type { VmSpec } from '../spec.ts'
import type { FencingLedger } from './ledger.ts'

/** One reliable, ordered message channel to a peer (the link's 'migrate' channel). */
export interface MigrationChannel {
  /** The remote member's PeerId. */
  readonly peer: string
  readonly open: boolean
  /** false = stop sending until drain() resolves (the message was still accepted). */
  send(message: Uint8Array): boolean
  /** Resolves when the send buffer is low again; rejects when the channel closes or the signal fires. */
  drain(signal?: AbortSignal): Promise<void>
  onMessage(handler: (message: Uint8Array) => void): () => void
  onClose(handler: (reason?: Error) => void): () => void
}

/** The overlay as migration sees it: this node, and a migrate channel per linked member. */
export interface MigrationNetwork {
  readonly self: string
  channel(peer: string): MigrationChannel | undefined
  channels(): MigrationChannel[]
  /** Called for every channel that opens (also re-opened ones after a link failure). */
  onChannel(handler: (channel: MigrationChannel) => void): () => void
  /** Builds the link to `peer` when the overlay keeps none (large meshes link members on demand);
   *  resolves when there is one or it cannot be built (channel() then says which). */
  connect?(peer: string, signal?: AbortSignal): Promise<void>
}

/**
 * The VMs of this host, as migration needs them. The agent's VM manager implements it (host.ts has a
 * small one over a bare VmDriver for tests and benchmarks). Fencing tokens live here because they must
 * outlive a migration session: a host refuses any command carrying a token older than the newest it has
 * seen for that VM.
 */
export interface VmHost {
  /** The VM of this name running (or paused) on this host, if any. */
  get(name: string): Vm | undefined
  /** A fresh, correctly sized RAM file for an incoming copy of `spec` (removed by discardRam or by
   *  the VM's stop()). */
  allocateRam(spec: VmSpec, signal?: AbortSignal): Promise<string>
  /** Removes a RAM file that no VM took over (a failed incoming migration). */
  discardRam(path: string): Promise<void>
  /**
   * Starts a VM that waits for device state, on a RAM file from allocateRam(). `volumeSeed`: see
   * StartOptions (the disk the VM left here, when the source counts writes since that move).
   */
  startIncoming(
    spec: VmSpec,
    memoryPath: string,
    signal?: AbortSignal,
    options?: { volumeSeed?: string },
  ): Promise<Vm>
  /** The incoming VM now runs here: the host owns it from now on (lists it, re-adopts it...). */
  adopt(vm: Vm): Promise<void>
  /** The VM moved away (it is stopped): forget it. */
  release(name: string): Promise<void>
  /** The driver's handle of a VM: what a commit record keeps to find the QEMU after an agent restart. */
  handle(vm: Vm): VmHandle
  /** Re-attaches to a VM of a handle (its process outlived the agent); throws when it is gone. */
  reattach(handle: VmHandle, signal?: AbortSignal): Promise<Vm>
  /** Tokens, switch and commit records, losses and history (see ledger.ts): persisted by real hosts. */
  readonly ledger: FencingLedger
  /** The newest fencing token this host has seen for a VM (0 when none). Same as ledger.token(). */
  token(name: string): number
  /** Records a newer token (persisted by real hosts before the call returns). Never lowers it. Same as
   *  ledger.setToken(). */
  setToken(name: string, token: number): Promise<void>
  /**
   * Records an outgoing switch before the source pauses the guest (persisted by real hosts before the
   * call returns). Until endSwitch(), the copy here must neither run nor be thrown away without an
   * answer from the destination: a source agent killed mid-switch finds the record when it restarts
   * and settles it (see settle.ts). Same as ledger.beginSwitch().
   */
  beginSwitch(record: SwitchRecord): Promise<void>
  /** The switch is settled: the VM runs here again, or it runs on the destination and ours is gone. */
  endSwitch(name: string): Promise<void>
  /** Switches begun and not ended (after an agent restart: the ones a killed agent left). */
  switches(): SwitchRecord[]
  /**
   * An incoming post-copy is paging (persisted before the guest runs): a destination agent killed
   * before the last owed chunk arrived finds it when it restarts and takes the pager back. Optional.
   */
  beginPostcopy?(record: PostcopyRecord): Promise<void>
  endPostcopy?(name: string): Promise<void>
  postcopies?(): PostcopyRecord[]
  /** Takes control again of a VM whose process lives but did not answer when the agent started. */
  readopt?(name: string): Promise<void>
}

/** An incoming post-copy in progress, as the destination persists it. */
export interface PostcopyRecord {
  vm: string
  token: number
  /** The source's PeerId. */
  from: string
  /** The incoming QEMU's pid and RAM file, and the pager's uffd inside it (taken back after a restart). */
  pid: number
  ramPath: string
  ramSize: number
  chunkSize: number
  qemuFd: number
  /** Base64 of the owed bitmap at the switch (what is still owed are the chunks still holes). */
  owed: string
  at: number
}

/** An outgoing move that reached the switch (the guest here may be paused) and is not settled yet. */
export interface SwitchRecord {
  vm: string
  /** The fencing token the move carries: the destination runs the VM only under this one. */
  token: number
  /** The destination's PeerId. */
  to: string
  /** When the switch began (ms since the epoch), for logs. */
  at: number
  /**
   * 'postcopy': the destination resumes before it holds all the memory; after its resume our paused
   * copy must be kept (never resumed, never stopped) until it says every owed chunk arrived.
   */
  mode?: 'postcopy'
}

/**
 * Chunks of guest RAM that this host held before (e.g. the last RAM of a VM that moved away), by
 * content hash (SHA-256 of the chunk, the chunk store's names). A destination that holds a chunk
 * fills it locally instead of asking for it: a return move A→B→A sends only what changed.
 */
export interface RamCache {
  has(hash: Uint8Array): boolean
  /** The chunk's bytes (verified); throws when it is gone or corrupt (the caller then asks the source). */
  get(hash: Uint8Array): Promise<Uint8Array>
  /**
   * Keeps the chunks of a RAM file (a VM that just moved away) under the VM's name, replacing what
   * was kept for it before. The file is only read. Runs after the move, off the critical path: with
   * `delayMs` it starts that much later, unless settled() brings it forward.
   */
  remember(vm: string, ramPath: string, chunkSize: number, options?: RememberOptions): Promise<void>
  /**
   * Resolves once no remember() of this VM is pending or running (a delayed one starts at once). A move
   * back calls it before it looks for chunks here: asked right after the VM left, it would otherwise find
   * none and have all the RAM sent again (migrate-e2e saw 66 MB instead of ~1 MB).
   */
  settled(vm: string): Promise<void>
  /** Drops what was kept for the VM (it moved back here and runs again). */
  forget(vm: string): Promise<void>
}

export interface RememberOptions {
  signal?: AbortSignal
  /** Start this much later (default 0). */
  delayMs?: number
}

/** The phases a migration goes through (progress events carry them). */
export type MigrationPhase =
  | 'prepare'
  | 'bulk'
  | 'precopy'
  | 'switch'
  | 'resumed'
  | 'postcopy'
  | 'done'
  | 'rollback'
  | 'failed'

/** What the source estimates the move will take (vm/migration/estimate.ts), as events and reports carry it. */
export interface MigrationEstimate {
  /** The migrate channel's send rate, bytes/s. */
  linkBytesPerSec: number
  /** The guest's dirty rate, bytes/s. */
  dirtyBytesPerSec: number
  /** RAM still to cross the link at least once. */
  outstandingBytes: number
  /** Distinct RAM the guest wrote during the move so far. */
  hotBytes: number
  /** The least the whole move can take by any mode, ms from its start. */
  minTotalMs: number
  /** What the planned mode predicts: whole move (ms from its start) and pause. */
  totalMs: number
  pauseMs: number
  mode: 'precopy' | 'postcopy'
  /** Against --deadline, once measured well enough. */
  feasible?: boolean
}

/** A progress event, emitted by both ends (the source's go to the CLI). */
export interface MigrationProgress {
  vm: string
  phase: MigrationPhase
  /** 0 = bulk copy, 1.. = pre-copy rounds; the final delta has the last number. */
  round: number
  /** Bytes put on the migrate channel so far (messages, headers included). */
  wireBytes: number
  /** Guest RAM bytes carried (decoded) so far, including pages filled from the destination's cache. */
  ramBytes: number
  /** Bytes the destination filled from its cache instead of the wire. */
  dedupBytes: number
  /** Of the current phase when known (bulk: all non-zero RAM; rounds: the dirty set). */
  phaseBytes?: number
  phaseDoneBytes?: number
  /** Wire rate over the last interval, bytes/s. */
  rateBytesPerSec: number
  /** The guest's dirty rate seen by the last round, bytes/s. */
  dirtyRateBytesPerSec: number
  /** Bytes dirty at the last round boundary. */
  dirtyBytes: number
  elapsedMs: number
  message?: string
  /** The source and the destination, by member name (source events carry them). */
  from?: string
  to?: string
  /** The source's current estimate (from the first seconds of the bulk copy on). */
  estimate?: MigrationEstimate
  /** The vCPU throttle now (0 = none; 0.9 = the guest's vCPUs get 10% of a CPU). */
  throttle?: number
  /** Post-copy: owed chunks not placed yet at the destination, bytes, and faults so far. */
  postcopyRemainingBytes?: number
}

/** The result of a successful move, as reported to whoever triggered it. */
export interface MigrationReport {
  vm: string
  /** PeerIds of the source and the destination. */
  from: string
  to: string
  /** Their member names, when known. */
  fromName?: string
  toName?: string
  token: number
  totalMs: number
  /** Guest paused on the source → guest running on the destination, by the two hosts' clocks. */
  downtimeMs: number
  /** The same measured on the source's clock only: pause → 'resumed' received, minus half an RTT. */
  downtimeSourceMs: number
  /** Round-trip time between the two hosts, measured on the migrate channel during the move. */
  rttMs: number
  /** Bytes of migration messages sent both ways. */
  wireBytes: number
  /** RAM bytes the destination filled from its cache (not sent). */
  dedupBytes: number
  /** 4 KiB pages sent as references to pages the destination already held (duplicates, not sent). */
  dupPageBytes: number
  /** Non-zero guest RAM at the start. */
  ramBytes: number
  /** Pre-copy rounds after the bulk copy (the final delta not counted). */
  rounds: number
  /** Bytes in the final delta (sent while the guest was paused). */
  finalDeltaBytes: number
  deviceStateBytes: number
  /** What the device state put on the wire during the pause (deflated, and sent as its difference from
   *  the reference copy sent during pre-copy when there was one). */
  deviceStateWireBytes?: number
  /** The reference copy of the device state sent during pre-copy (0: none, e.g. the driver has none). */
  stateRefBytes?: number
  /** The VM's writable disk: what its overlay held at the start (the guest's writes beyond its base),
   *  the disk bytes put on the wire (compressed), and what the destination already held. */
  diskWrittenBytes?: number
  diskSentBytes?: number
  /** Disk bytes the source read (bulk, rounds, final), and whether the destination started from the
   *  disk the VM left there (then the bulk covered only what the guest wrote since it arrived here). */
  diskReadBytes?: number
  diskSeeded?: boolean
  diskDedupBytes?: number
  /** Why pre-copy ended: 'small', 'not-shrinking', 'max-rounds', 'deadline'. */
  switchReason: string
  deadlineMs?: number
  /** Where the time went, ms by step (prepare, trackerStart, scan, bulk, rounds, pause, saveState,
   *  finalSend, ready (destination wrote + loaded), resumed (commit → resumed), postcopy). */
  timings: Record<string, number>
  /**
   * How the move ended: 'precopy' (the guest resumed on the destination with all its memory there) or
   * 'postcopy' (it resumed before the owed chunks arrived; they followed on first touch and in the
   * background, the source keeping its paused copy until the last one was placed).
   */
  mode?: 'precopy' | 'postcopy'
  /** The longest pause allowed (--max-pause; 1 s by default with --deadline). */
  maxPauseMs?: number
  /** The estimate the move was judged on (the first confident one). */
  estimate?: MigrationEstimate
  /** With --best-effort: by how much the move missed its deadline, ms (0 or absent: it made it). */
  deadlineMissedByMs?: number
  /** The vCPU throttle, if it was used: highest level, levels stepped through, the cgroup backend. */
  throttle?: { maxLevel: number; steps: number; backend: string }
  /** Post-copy's figures. */
  postcopy?: {
    owedBytes: number
    /** Resumed on the destination → last owed chunk placed. */
    ms: number
    /** Owed chunks the guest touched before they arrived, the longest wait for one (ms), zero pages. */
    faults: number
    maxFaultWaitMs: number
    zeroFaults: number
    /** Chunks sent because the guest asked for them, in the background, and sessions (> 1: link cuts). */
    urgentChunks: number
    backgroundChunks: number
    sessions: number
  }
}
