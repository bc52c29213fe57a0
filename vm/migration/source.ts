import { open } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { AbortError, describeError, MeshError, throwIfAborted } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import type { DirtyRound, Vm } from '../driver/interfaces.ts'
import { parseImageRef } from '../spec.ts'
import { Conversation } from './conversation.ts'
import { MigrationInDoubtError, MigrationLinkError } from './errors.ts'
import type {
  MigrationNetwork,
  MigrationPhase,
  MigrationProgress,
  MigrationReport,
  RamCache,
  VmHost,
} from './interfaces.ts'
import { PAGE_SIZE, RamEncoder } from './ram.ts'
import { resolveInDoubt } from './settle.ts'
import {
  type EncodedChunk,
  encodeDataMessage,
  encodeMessage,
  encodeStateDelta,
  HASH_SIZE,
  MAX_CHUNKS_PER_DATA,
  MAX_OFFER_ENTRIES,
  MAX_STATE_BYTES,
  MAX_WIRE_MESSAGE,
  type Message,
  newSessionId,
  TARGET_MESSAGE_BYTES,
} from './v1/messages.ts'

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
}

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
  tuning?: MigrationTuning
  onProgress?: (p: MigrationProgress) => void
  /** Work that goes on after the move (keeping RAM chunks); the service waits for it on stop. */
  background?: (p: Promise<unknown>) => void
  signal?: AbortSignal
}

const DEFAULTS: Required<MigrationTuning> = {
  chunkSize: 64 * 1024,
  compress: true,
  maxRounds: 8,
  switchBytes: 1024 * 1024,
  timeoutMs: 30_000,
  inDoubtMs: 60_000,
  rememberDelayMs: 2000,
}

/** Moves a running VM of this host to `to`. Resolves with the report once the destination runs it. */
export async function migrateOut(init: SourceInit): Promise<MigrationReport> {
  const t = { ...DEFAULTS, ...init.tuning }
  const { vm, host, log, signal } = init
  const name = vm.spec.name
  const started = performance.now()
  const channel = init.network.channel(init.to)
  if (channel === undefined || !channel.open) throw new MigrationLinkError(`no link to ${init.to}`)
  const sid = newSessionId()
  const conv = new Conversation(channel, sid)
  const unregister = init.register(sid, conv)
  const token = host.token(name) + 1
  const size = vm.memory.size
  let phase: MigrationPhase = 'prepare'
  let round = 0
  let dirtyRate = 0
  let dirtyBytes = 0
  let ramBytes = 0
  let dedupBytes = 0
  let phaseBytes: number | undefined
  let phaseDone = 0
  let lastEmit = 0
  let lastWire = 0
  let lastAt = started
  let rate = 0
  const emit = (force = false, message?: string) => {
    const now = performance.now()
    if (!force && now - lastEmit < 200) return
    if (now - lastAt >= 100) {
      rate = ((conv.wireBytes - lastWire) * 1000) / (now - lastAt)
      lastWire = conv.wireBytes
      lastAt = now
    }
    lastEmit = now
    const p: MigrationProgress = {
      vm: name,
      phase,
      round,
      wireBytes: conv.wireBytes,
      ramBytes,
      dedupBytes,
      rateBytesPerSec: rate,
      dirtyRateBytesPerSec: dirtyRate,
      dirtyBytes,
      elapsedMs: now - started,
    }
    if (phaseBytes !== undefined) {
      p.phaseBytes = phaseBytes
      p.phaseDoneBytes = phaseDone
    }
    if (message !== undefined) p.message = message
    init.onProgress?.(p)
  }
  const setPhase = (p: MigrationPhase, message?: string) => {
    phase = p
    emit(true, message)
  }

  const timings: Record<string, number> = {}
  let mark = performance.now()
  const lap = (step: string) => {
    const now = performance.now()
    timings[step] = Math.round((now - mark) * 10) / 10
    mark = now
  }
  let encoder: RamEncoder | undefined
  let tracker: ReturnType<Vm['dirtyTracker']> | undefined
  let paused = false
  let switching = false
  let committed = false
  let destRunning = false
  let destDeclined = false
  try {
    throwIfAborted(signal)
    if (vm.status() !== 'running') throw new MigrationLinkError(`VM '${name}' is ${vm.status()}, not running`)
    const images = [vm.spec.kernel, vm.spec.initrd, vm.spec.disk].filter(
      (v): v is string => v !== undefined && parseImageRef(v) !== undefined,
    )
    setPhase('prepare', `to ${init.to}`)
    const prep: Message = {
      type: 'prepare',
      sid,
      spec: vm.spec,
      token,
      ramSize: size,
      chunkSize: t.chunkSize,
      pageSize: PAGE_SIZE,
      images,
    }
    if (init.deadlineMs !== undefined) prep.deadlineMs = init.deadlineMs
    await conv.send(prep, signal)
    await conv.next(['accept'], 'accept', t.timeoutMs, signal)

    // Clocks and RTT: the best of three pings, to turn the destination's timestamps into ours.
    let rttMs = Number.POSITIVE_INFINITY
    let offsetMs = 0
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now()
      const p0 = performance.now()
      await conv.send({ type: 'ping', sid, t0 }, signal)
      const pong = await conv.next(['pong'], 'pong', t.timeoutMs, signal)
      const rtt = performance.now() - p0
      if (rtt < rttMs) {
        rttMs = rtt
        offsetMs = pong.t1 - (t0 + rtt / 2)
      }
    }

    lap('prepare')
    // Bulk copy. The tracker's baseline comes first: anything written after it is caught by a round.
    setPhase('bulk')
    tracker = vm.dirtyTracker({ chunkSize: t.chunkSize })
    await tracker.start(signal)
    lap('trackerStart')
    encoder = new RamEncoder(vm.memory.path, size, t.chunkSize, false)
    const enc = encoder
    const scan = await enc.scan()
    lap('scan')
    phaseBytes = scan.nonZeroBytes
    const ramAtStart = scan.nonZeroBytes
    const batches: number[][] = []
    for (let i = 0; i < scan.indices.length; i += MAX_OFFER_ENTRIES) {
      const indices = scan.indices.slice(i, i + MAX_OFFER_ENTRIES)
      batches.push(indices)
      await conv.send(
        {
          type: 'offer',
          sid,
          batch: batches.length - 1,
          indices,
          hashes: scan.hashes.subarray(i * HASH_SIZE, (i + indices.length) * HASH_SIZE),
        },
        signal,
      )
    }
    let dedupChunks = 0
    // Chunks go out in batches of raw encoded chunks; each batch is deflated as one message in the
    // thread pool (fewer, larger zlib calls than per chunk: measured less CPU and GC), several in
    // flight, sent in order. Batches that do not compress are sent plain, and after a run of those
    // compression pauses for a while (random data only burns CPU).
    let zSkip = 0
    let zFails = 0
    const plainMessages = (r: number, chunks: EncodedChunk[]): Uint8Array[] => {
      const out: Uint8Array[] = []
      let batch: EncodedChunk[] = []
      let bytes = 0
      for (const c of chunks) {
        const sz = 10 + c.kinds.length + c.refs.length * 4 + c.literal.byteLength
        if (batch.length > 0 && bytes + sz > TARGET_MESSAGE_BYTES) {
          out.push(encodeMessage({ type: 'data', sid, round: r, chunks: batch }))
          batch = []
          bytes = 0
        }
        batch.push(c)
        bytes += sz
      }
      if (batch.length > 0) out.push(encodeMessage({ type: 'data', sid, round: r, chunks: batch }))
      return out
    }
    const pack = (r: number, chunks: EncodedChunk[]): Promise<Uint8Array[]> => {
      const tryZ = t.compress && zSkip === 0
      if (zSkip > 0) zSkip--
      if (!tryZ) return Promise.resolve(plainMessages(r, chunks))
      return encodeDataMessage({ type: 'data', sid, round: r, chunks }, true).then(
        ({ bytes, compressed }) => {
          if (compressed) zFails = 0
          else if (++zFails >= 3) {
            zFails = 0
            zSkip = 4
          }
          return compressed && bytes.byteLength <= MAX_WIRE_MESSAGE ? [bytes] : plainMessages(r, chunks)
        },
      )
    }
    // Raw batches just under the link limit: whatever compresses by 10% then fits one message.
    const rawBatch = t.compress ? MAX_WIRE_MESSAGE - 4096 : TARGET_MESSAGE_BYTES
    const sendChunks = async (indices: number[], r: number): Promise<void> => {
      const GROUP = 64
      const inflight: Promise<Uint8Array[]>[] = []
      const flushOne = async () => {
        for (const m of await inflight.shift()!) await conv.sendRaw(m, signal)
      }
      let batch: EncodedChunk[] = []
      let batchBytes = 0
      for (let g = 0; g < indices.length; g += GROUP) {
        for (const p of enc.encode(indices.slice(g, g + GROUP))) {
          const c = await p
          const sz = 10 + c.kinds.length + c.refs.length * 4 + c.literal.byteLength
          if (batch.length > 0 && (batchBytes + sz > rawBatch || batch.length >= MAX_CHUNKS_PER_DATA)) {
            inflight.push(pack(r, batch))
            batch = []
            batchBytes = 0
            while (inflight.length > 3) await flushOne()
          }
          batch.push(c)
          batchBytes += sz
          ramBytes += t.chunkSize
          phaseDone += t.chunkSize
          emit()
        }
      }
      if (batch.length > 0) inflight.push(pack(r, batch))
      while (inflight.length > 0) await flushOne()
    }
    for (let b = 0; b < batches.length; b++) {
      const want = await conv.next(['want'], 'want', t.timeoutMs, signal)
      const offered = batches[want.batch]
      if (offered === undefined)
        throw new MigrationLinkError(`destination answered an unknown offer ${want.batch}`)
      const wanted = new Set(want.indices)
      for (const i of offered) {
        if (!wanted.has(i)) {
          enc.markFilled(i)
          dedupChunks++
          dedupBytes += t.chunkSize
          ramBytes += t.chunkSize
          phaseDone += t.chunkSize
        }
      }
      await sendChunks(
        want.indices.filter((i) => i >= 0 && i < enc.chunkCount),
        0,
      )
    }
    await conv.send(
      { type: 'round', sid, round: 0, chunks: scan.indices.length, bytes: scan.nonZeroBytes },
      signal,
    )

    lap('bulk')
    /** Device state in message-sized pieces (at least one, even when empty). */
    const sendPieces = async (type: 'state' | 'stateref', bytes: Uint8Array) => {
      for (let o = 0; o < bytes.byteLength || o === 0; o += TARGET_MESSAGE_BYTES) {
        const piece = bytes.subarray(o, o + TARGET_MESSAGE_BYTES)
        await conv.send({ type, sid, offset: o, total: bytes.byteLength, bytes: piece }, signal)
        if (bytes.byteLength === 0) break
      }
    }
    // A reference copy of the device state, sent while the guest runs (stopped only for the save's few
    // ms): at the switch only its difference travels. QEMU's device state is mostly ROM blocks that never
    // change (~360 KB → a few KB; across NATs the migrate channel may move only ~5 MB/s, so this is tens
    // of ms of downtime).
    let stateRef: Uint8Array | undefined
    if (vm.snapshotState !== undefined) {
      try {
        stateRef = await vm.snapshotState(signal)
      } catch (err) {
        if (err instanceof AbortError) throw err
        // Not fatal: the switch then sends the whole state, as it would without a snapshot.
        log.warn('device state snapshot failed; the switch sends the whole state', {
          vm: name,
          error: describeError(err),
        })
      }
      if (stateRef !== undefined && stateRef.byteLength > MAX_STATE_BYTES) stateRef = undefined
      if (stateRef !== undefined) await sendPieces('stateref', stateRef)
      lap('stateRef')
    }
    // Pre-copy rounds until the dirty set is small, stops shrinking, rounds run out, or the deadline nears.
    setPhase('precopy')
    let prevDirty = Number.POSITIVE_INFINITY
    let switchReason = 'max-rounds'
    let pending: DirtyRound
    const deadlineAt = init.deadlineMs === undefined ? undefined : started + init.deadlineMs
    let sendRate = 0
    for (;;) {
      pending = await tracker.collect(signal)
      dirtyRate = pending.rateBytesPerSec
      dirtyBytes = pending.dirtyBytes
      if (pending.dirtyBytes <= t.switchBytes) {
        switchReason = 'small'
        break
      }
      if (round >= 1 && pending.dirtyBytes >= prevDirty * 0.9) {
        switchReason = 'not-shrinking'
        break
      }
      if (round >= t.maxRounds) {
        switchReason = 'max-rounds'
        break
      }
      if (deadlineAt !== undefined) {
        // Another round costs its send time plus a scan; the switch needs the final delta, the device
        // state and the resume. Keep a margin of a fifth of the deadline for what we cannot see.
        const rateGuess = sendRate > 0 ? sendRate : 50 * 1024 * 1024
        const roundMs = (pending.dirtyBytes * 1000) / rateGuess + pending.scanMs
        const switchMs = 1000 + (pending.dirtyBytes * 1000) / rateGuess
        if (performance.now() + roundMs + switchMs > deadlineAt - init.deadlineMs! * 0.2) {
          switchReason = 'deadline'
          break
        }
      }
      prevDirty = pending.dirtyBytes
      round++
      phaseBytes = pending.dirtyBytes
      phaseDone = 0
      emit(true)
      const w0 = conv.sentBytes
      const r0 = performance.now()
      await sendChunks(pending.chunks, round)
      await conv.send(
        { type: 'round', sid, round, chunks: pending.chunks.length, bytes: pending.dirtyBytes },
        signal,
      )
      const ms = performance.now() - r0
      if (ms > 5) sendRate = ((conv.sentBytes - w0) * 1000) / ms
    }

    // Switch: pause, collect the last dirty chunks while QEMU writes out the device state.
    lap('rounds')
    setPhase('switch', switchReason)
    // Recorded (persisted) before the pause: an agent killed from here on leaves a paused QEMU that
    // the next agent must settle with the destination instead of resuming it blindly.
    switching = true
    await host.beginSwitch?.({ vm: name, token, to: init.to, at: Date.now() })
    const pausedAt = Date.now()
    const pausedPerf = performance.now()
    paused = true
    await vm.pause(signal)
    lap('pause')
    // The final delta is computed against what the destination holds, not from the tracker (see
    // RamEncoder.finalDelta), while QEMU writes out the device state.
    const [state, finalSet] = await Promise.all([vm.saveState(signal), enc.finalDelta(vm.memory.path)])
    lap('saveState')
    const w0 = conv.sentBytes
    phaseBytes = finalSet.length * t.chunkSize
    phaseDone = 0
    const finalRound = round + 1
    await sendChunks(finalSet, finalRound)
    const finalDeltaBytes = conv.sentBytes - w0
    const s0 = conv.sentBytes
    const zstate = await encodeStateDelta(sid, state, stateRef)
    if (zstate !== undefined) await conv.sendRaw(zstate, signal)
    // Too big for one message even deflated (or empty): the plain pieces.
    else await sendPieces('state', state)
    const deviceStateWireBytes = conv.sentBytes - s0
    await conv.send({ type: 'final', sid, token, round: finalRound, pausedAt }, signal)
    lap('finalSend')
    await conv.next(['ready'], 'ready (destination loaded the state)', t.timeoutMs, signal)
    lap('ready')

    // Point of no return for the source: from here it never resumes unless it learns that the
    // destination did not (and never will) resume.
    committed = true
    await conv.send({ type: 'commit', sid, token }, signal)
    let resumedAt: number
    let resumedSeenPerf: number
    try {
      const r = await conv.next(['resumed'], 'resumed', t.timeoutMs, signal)
      resumedAt = r.resumedAt
      resumedSeenPerf = performance.now()
    } catch (err) {
      if (err instanceof AbortError) throw err
      log.warn('commit sent but no answer: asking the destination', { vm: name, error: describeError(err) })
      const outcome = await resolveInDoubt(init, init.to, name, token, t.inDoubtMs)
      if (outcome !== 'running') {
        destDeclined = true
        throw new MigrationLinkError(`destination did not resume (${outcome})`, { cause: err })
      }
      resumedAt = Date.now()
      resumedSeenPerf = performance.now()
    }
    destRunning = true
    lap('resumed')
    const downtimeSourceMs = Math.max(0, resumedSeenPerf - pausedPerf - rttMs / 2)
    const downtimeMs = Math.max(0, resumedAt - offsetMs - pausedAt)
    setPhase('resumed')

    // The destination runs the VM and holds the token: let go of ours.
    await host.setToken(name, token)
    await tracker.close().catch(() => {})
    tracker = undefined
    encoder.close()
    encoder = undefined
    // Hold the RAM file open across stop() (which deletes it) so its chunks can still be kept.
    const kept = init.cache === undefined ? undefined : await open(vm.memory.path, 'r').catch(() => undefined)
    await vm.stop()
    await host.release(name)
    await host.endSwitch?.(name)
    const report: MigrationReport = {
      vm: name,
      from: init.network.self,
      to: init.to,
      token,
      totalMs: performance.now() - started,
      downtimeMs,
      downtimeSourceMs,
      rttMs,
      wireBytes: conv.wireBytes,
      dedupBytes: dedupChunks * t.chunkSize,
      dupPageBytes: enc.stats.dupPages * PAGE_SIZE,
      ramBytes: ramAtStart,
      rounds: round,
      finalDeltaBytes,
      deviceStateBytes: state.byteLength,
      deviceStateWireBytes,
      stateRefBytes: stateRef?.byteLength ?? 0,
      switchReason,
      timings,
    }
    if (init.deadlineMs !== undefined) report.deadlineMs = init.deadlineMs
    setPhase('done')
    if (kept !== undefined && init.cache !== undefined) {
      // Keep the last RAM as chunks so a later move back here sends only what changed. Not at once:
      // hashing the RAM costs ~0.5 s of CPU, and the guest's first moments on its new host need this
      // host's switch (held frames, stragglers) and the CPU more (measured: stalls seen by a client).
      const cache = init.cache
      const p = sleep(t.rememberDelayMs)
        .then(() => cache.remember(name, `/proc/self/fd/${kept.fd}`, t.chunkSize))
        .catch((err: unknown) =>
          log.warn('keeping RAM chunks failed', { vm: name, error: describeError(err) }),
        )
        .finally(() => kept.close())
      if (init.background !== undefined) init.background(p)
      else void p
    }
    return report
  } catch (err) {
    if (destRunning) {
      // The destination runs the VM: ours must never run again, whatever failed while letting go.
      log.error('cleanup after a successful move failed', { vm: name, error: describeError(err) })
      await vm.stop().catch(() => {})
      await host.release(name).catch(() => {})
      await host.endSwitch?.(name).catch(() => {})
      throw err
    }
    // After the commit, only an answer from the destination ('discarded', 'absent') lets us resume;
    // without one the VM stays paused (in doubt) and the switch record stays: the service settles it
    // (settle.ts) once the destination answers.
    if (committed && !destDeclined) {
      log.error('migration in doubt: the VM stays paused here', { vm: name, error: describeError(err) })
      throw err instanceof MigrationInDoubtError
        ? err
        : new MigrationInDoubtError(
            `VM '${name}': ${describeError(err)}; it stays paused here until ${init.to} says whether it resumed (this host keeps asking)`,
            { cause: err },
          )
    }
    phase = 'rollback'
    emit(true, describeError(err))
    conv.trySend({
      type: 'abort',
      sid,
      code: (err as { code?: string }).code ?? 'E_MIGRATION',
      reason: describeError(err),
    })
    if (paused && vm.status() === 'paused') {
      try {
        await vm.resume()
      } catch (resumeErr) {
        log.error('rollback: resuming the VM failed', { vm: name, error: describeError(resumeErr) })
      }
    }
    if (switching) await host.endSwitch?.(name).catch(() => {})
    // Say where the VM is now: the operator's question after a failed move.
    if (err instanceof MeshError && !(err instanceof AbortError))
      err.message = `${err.message}; rolled back: VM '${name}' is ${vm.status()} on ${init.network.self}`
    throw err
  } finally {
    unregister()
    conv.close()
    encoder?.close()
    await tracker?.close().catch(() => {})
  }
}
