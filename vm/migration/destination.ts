import { AbortError, describeError } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import type { Vm } from '../driver/interfaces.ts'
import type { Conversation } from './conversation.ts'
import { MigrationDecodeError, MigrationError, MigrationRefusedError, StaleTokenError } from './errors.ts'
import type { MigrationProgress, RamCache, VmHost } from './interfaces.ts'
import { RamWriter } from './ram.ts'
import { applyStateDelta, HASH_SIZE, type Message } from './v1/messages.ts'

type Prepare = Extract<Message, { type: 'prepare' }>

export interface DestinationInit {
  conv: Conversation
  prepare: Prepare
  host: VmHost
  cache?: RamCache
  log: Logger
  /** Longest silence from the source before the destination gives up (default 30 s). */
  timeoutMs?: number
  onProgress?: (p: MigrationProgress) => void
  signal?: AbortSignal
}

/** What a destination session ended as; kept by the service to answer the source's 'query'. */
export type DestinationOutcome = 'running' | 'discarded'

/**
 * Receives a VM. Refuses stale tokens; writes chunks into its own RAM file while an incoming VM starts
 * next to it; loads the device state; resumes only on the source's commit. On any failure before that
 * the incoming VM is stopped and its RAM file removed, so nothing of the attempt remains.
 */
export async function migrateIn(init: DestinationInit): Promise<DestinationOutcome> {
  const { conv, prepare, host, log, signal } = init
  const spec = prepare.spec
  const name = spec.name
  const timeoutMs = init.timeoutMs ?? 30_000
  const sid = conv.sid
  const started = performance.now()

  const have = host.token(name)
  if (prepare.token <= have) {
    const err = new StaleTokenError(name, prepare.token, have)
    conv.trySend({ type: 'refuse', sid, code: err.code, reason: err.message })
    throw err
  }
  if (host.get(name) !== undefined) {
    const reason = `VM '${name}' already runs on ${conv.channel.peer === '' ? 'this host' : 'the destination'}`
    conv.trySend({ type: 'refuse', sid, code: 'E_VM_EXISTS', reason })
    throw new MigrationRefusedError(reason)
  }
  if (prepare.ramSize % prepare.chunkSize !== 0) {
    conv.trySend({
      type: 'refuse',
      sid,
      code: 'E_BAD_GEOMETRY',
      reason: 'RAM size is not a multiple of the chunk size',
    })
    throw new MigrationDecodeError('RAM size is not a multiple of the chunk size')
  }

  let ramPath: string | undefined
  let writer: RamWriter | undefined
  let vm: Vm | undefined
  let vmStart: Promise<Vm> | undefined
  let resumed = false
  const startAbort = new AbortController()
  const onAbort = () => startAbort.abort(signal?.reason)
  signal?.addEventListener('abort', onAbort, { once: true })
  try {
    ramPath = await host.allocateRam(spec, signal)
    writer = new RamWriter(ramPath, prepare.ramSize, prepare.chunkSize)
    // Start the incoming VM now: it boots (and waits) while the RAM arrives, off the downtime.
    vmStart = host.startIncoming(spec, ramPath, startAbort.signal)
    vmStart.catch(() => {}) // observed at 'final'
    await conv.send({ type: 'accept', sid, cachedChunks: 0 }, signal)
    log.info('receiving VM', { vm: name, from: conv.channel.peer, token: prepare.token })

    const state: Buffer[] = []
    let stateTotal = -1
    let stateGot = 0
    /** The source's reference copy of the device state (stateref), which a zstate may be sent against. */
    const ref: Buffer[] = []
    let refTotal = -1
    let refGot = 0
    let zstate: Buffer | undefined
    let round = 0
    let lastEmit = 0
    const emit = (phase: MigrationProgress['phase'], force = false) => {
      const now = performance.now()
      if (!force && now - lastEmit < 250) return
      lastEmit = now
      init.onProgress?.({
        vm: name,
        phase,
        round,
        wireBytes: conv.wireBytes,
        ramBytes: writer?.ramBytes ?? 0,
        dedupBytes: writer?.cachedBytes ?? 0,
        rateBytesPerSec: 0,
        dirtyRateBytesPerSec: 0,
        dirtyBytes: 0,
        elapsedMs: now - started,
      })
    }
    for (;;) {
      const m = await conv.next(
        ['offer', 'data', 'round', 'state', 'stateref', 'zstate', 'final', 'ping'],
        'the source',
        timeoutMs,
        signal,
      )
      if (m.type === 'ping') {
        await conv.send({ type: 'pong', sid, t0: m.t0, t1: Date.now() }, signal)
      } else if (m.type === 'offer') {
        const want: number[] = []
        for (let i = 0; i < m.indices.length; i++) {
          const idx = m.indices[i]!
          const hash = m.hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE)
          let filled = false
          if (init.cache?.has(hash) === true) {
            try {
              writer.fill(idx, await init.cache.get(hash))
              filled = true
            } catch (err) {
              if (err instanceof MigrationDecodeError) throw err
              // Gone or corrupt in the cache: ask the source instead.
              log.debug('cached chunk unusable', { error: describeError(err) })
            }
          }
          if (!filled) want.push(idx)
        }
        await conv.send({ type: 'want', sid, batch: m.batch, indices: want }, signal)
        emit('bulk')
      } else if (m.type === 'data') {
        for (const c of m.chunks) writer.apply(c)
        emit(round === 0 ? 'bulk' : 'precopy')
      } else if (m.type === 'round') {
        round = m.round + 1
        emit('precopy', true)
      } else if (m.type === 'stateref') {
        if (refTotal === -1) refTotal = m.total
        if (m.total !== refTotal || m.offset !== refGot)
          throw new MigrationDecodeError('reference device state pieces out of order')
        ref.push(Buffer.from(m.bytes))
        refGot += m.bytes.byteLength
      } else if (m.type === 'zstate') {
        if (stateTotal !== -1 || zstate !== undefined)
          throw new MigrationDecodeError('device state sent twice')
        const whole = m.xor && refGot === refTotal ? Buffer.concat(ref) : undefined
        zstate = applyStateDelta(m, whole)
        ref.length = 0
      } else if (m.type === 'state') {
        if (zstate !== undefined) throw new MigrationDecodeError('device state sent twice')
        if (stateTotal === -1) stateTotal = m.total
        if (m.total !== stateTotal || m.offset !== stateGot)
          throw new MigrationDecodeError('device state pieces out of order')
        state.push(Buffer.from(m.bytes))
        stateGot += m.bytes.byteLength
      } else {
        if (m.token !== prepare.token) throw new StaleTokenError(name, m.token, prepare.token)
        if (zstate === undefined && (stateGot !== stateTotal || stateTotal <= 0))
          throw new MigrationDecodeError('final before the whole device state')
        emit('switch', true)
        vm = await vmStart
        await vm.loadState(zstate ?? Buffer.concat(state), signal)
        await conv.send({ type: 'ready', sid, loadedAt: Date.now() }, signal)
        break
      }
    }
    const commit = await conv.next(['commit'], 'commit', timeoutMs, signal)
    if (commit.token !== prepare.token) throw new StaleTokenError(name, commit.token, prepare.token)
    // The token is recorded before the guest runs: after a crash here the host still knows it owns
    // the VM under this token and refuses the older one.
    await host.setToken(name, prepare.token)
    await vm.resume()
    resumed = true
    const resumedAt = Date.now()
    await host.adopt(vm)
    await init.cache?.forget(name).catch(() => {})
    conv.trySend({ type: 'resumed', sid, token: prepare.token, resumedAt })
    writer.close()
    writer = undefined
    emit('resumed', true)
    log.info('VM resumed here', { vm: name, token: prepare.token, from: conv.channel.peer })
    return 'running'
  } catch (err) {
    if (resumed) {
      // Already running here under the new token: never discard a running guest.
      log.error('after resume', { vm: name, error: describeError(err) })
      return 'running'
    }
    if (!(err instanceof AbortError) && !(err instanceof MigrationError && conv.failed === err))
      conv.trySend({
        type: 'abort',
        sid,
        code: (err as { code?: string }).code ?? 'E_MIGRATION',
        reason: describeError(err),
      })
    log.warn('incoming migration failed; discarding', { vm: name, error: describeError(err) })
    startAbort.abort(err)
    writer?.close()
    writer = undefined
    if (vm === undefined && vmStart !== undefined) vm = await vmStart.catch(() => undefined)
    if (vm !== undefined) await vm.stop().catch(() => {})
    if (ramPath !== undefined) await host.discardRam(ramPath).catch(() => {})
    throw err
  } finally {
    signal?.removeEventListener('abort', onAbort)
    writer?.close()
  }
}
