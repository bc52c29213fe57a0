/**
 * The destination's side of post-copy: the pager (vm/postcopy) holds the guest's first touch of every
 * owed chunk; this asks the source for those (pcwant, batched per event-loop turn), places whatever
 * arrives (pcdata), acknowledges placements (pcack: the source's background window), and once nothing is
 * owed lets the pager go and tells the source (pcdone).
 *
 * It outlives a link too: when its conversation fails, attach() a new one (after 'pcresume' + 'owed'
 * went out on it) and every chunk the guest is waiting for is asked again.
 */
import { AbortError, describeError } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import type { Pager, PagerStats } from '../postcopy/pager.ts'
import { Conversation } from './conversation.ts'
import {
  MigrationAbortedError,
  MigrationDecodeError,
  MigrationLostError,
  MigrationTimeoutError,
} from './errors.ts'
import type { MigrationNetwork } from './interfaces.ts'
import { bitmapChunks, chunkBitmap } from './postcopy-source.ts'
import { literalPages, PAGE_SIZE } from './ram.ts'
import { type EncodedChunk, type Message, newSessionId, PAGE_LITERAL } from './v1/messages.ts'

/** Placements between two acknowledgements (each one: a ~40-byte message per 64 KiB chunk, and the
 *  source's window may be as small as one chunk). */
const ACK_EVERY = 1

/** One pcdata chunk as the bytes to place (zero pages zero). */
export function decodePostcopyChunk(c: EncodedChunk, chunkSize: number): Buffer {
  const pages = chunkSize / PAGE_SIZE
  const literal = literalPages(c, pages, 'pcdata chunk')
  if (literal.byteLength === chunkSize) return Buffer.from(literal)
  const out = Buffer.alloc(chunkSize)
  let l = 0
  for (let p = 0; p < pages; p++) {
    if (c.kinds[p] !== PAGE_LITERAL) continue
    literal.copy(out, p * PAGE_SIZE, l * PAGE_SIZE, (l + 1) * PAGE_SIZE)
    l++
  }
  return out
}

export interface ReceiverStats {
  owedChunks: number
  /** Owed chunks the guest touched before they arrived. */
  faults: number
  placedChunks: number
  /** Longest time from a fault's request to its chunk's placement, ms. */
  maxFaultMs: number
}

export class PostcopyReceiver {
  readonly stats: ReceiverStats
  private readonly owed: Set<number>
  /** Faulted and asked for, not yet placed: asked again on a new session. */
  private readonly waiting = new Map<number, number>()
  private askQueue: number[] = []
  private askScheduled = false
  private conv: Conversation | undefined
  private unroute: (() => void) | undefined
  private readonly offFault: () => void
  private sinceAck = 0
  /** Chunks received on the current session (the source counts what it sent on it). */
  private received = 0
  readonly complete: Promise<PagerStats>
  private resolveComplete!: (s: PagerStats) => void
  private rejectComplete!: (e: Error) => void
  private finishing = false

  constructor(
    private readonly pager: Pager,
    owed: Iterable<number>,
    private readonly chunkSize: number,
    private readonly chunkCount: number,
  ) {
    this.owed = new Set(owed)
    this.stats = { owedChunks: this.owed.size, faults: 0, placedChunks: 0, maxFaultMs: 0 }
    this.complete = new Promise<PagerStats>((resolve, reject) => {
      this.resolveComplete = resolve
      this.rejectComplete = reject
    })
    this.complete.catch(() => {})
    this.offFault = pager.onFault((chunk) => this.onFault(chunk))
    pager.failed.catch((err: Error) => this.rejectComplete(err))
    if (this.owed.size === 0) void this.finish()
  }

  get remaining(): number {
    return this.owed.size
  }

  /** Owed chunks the guest waits for right now. */
  get waitingCount(): number {
    return this.waiting.size
  }

  /** When a chunk last arrived (performance.now()). */
  lastDataAt = performance.now()

  /** The still-owed chunks as a bitmap (what 'owed' carries after 'pcresume'). */
  owedBitmap(): Uint8Array {
    return chunkBitmap(this.owed, this.chunkCount)
  }

  /** Receives on a conversation; chunks the guest waits for are asked (again) on it. */
  attach(conv: Conversation): void {
    this.unroute?.()
    this.conv = conv
    this.sinceAck = 0
    this.received = 0
    this.unroute = conv.route(['pcdata'], (m) => this.onData(m))
    for (const c of this.waiting.keys()) this.askQueue.push(c)
    this.scheduleAsk()
  }

  private onFault(chunk: number): void {
    if (!this.owed.has(chunk) || this.waiting.has(chunk)) return
    this.stats.faults++
    this.waiting.set(chunk, performance.now())
    this.askQueue.push(chunk)
    this.scheduleAsk()
  }

  /** One pcwant per event-loop turn with every chunk asked for in it. */
  private scheduleAsk(): void {
    if (this.askScheduled || this.askQueue.length === 0) return
    this.askScheduled = true
    setImmediate(() => {
      this.askScheduled = false
      const conv = this.conv
      if (conv === undefined || conv.failed !== undefined) return
      const indices = this.askQueue.filter((c) => this.owed.has(c))
      this.askQueue = []
      for (let i = 0; i < indices.length; i += 4096)
        conv.trySend({ type: 'pcwant', sid: conv.sid, indices: indices.slice(i, i + 4096) })
    })
  }

  private onData(m: Message): void {
    if (m.type !== 'pcdata') return
    this.lastDataAt = performance.now()
    try {
      for (const c of m.chunks) {
        if (!Number.isInteger(c.index) || c.index < 0 || c.index >= this.chunkCount)
          throw new MigrationDecodeError(`pcdata chunk ${c.index} outside guest RAM`)
        const bytes = decodePostcopyChunk(c, this.chunkSize)
        this.received++
        if (!this.owed.delete(c.index)) continue
        // The pipe to the pager buffers; its own backpressure is the source's window.
        this.pager.fill(c.index, bytes)
        this.stats.placedChunks++
        const asked = this.waiting.get(c.index)
        if (asked !== undefined) {
          this.waiting.delete(c.index)
          this.stats.maxFaultMs = Math.max(this.stats.maxFaultMs, performance.now() - asked)
        }
      }
    } catch (err) {
      this.rejectComplete(err as Error)
      this.conv?.fail(err as Error)
      return
    }
    const conv = this.conv!
    if (++this.sinceAck >= ACK_EVERY || this.owed.size === 0) {
      this.sinceAck = 0
      conv.trySend({ type: 'pcack', sid: conv.sid, placed: this.received })
    }
    if (this.owed.size === 0) void this.finish()
  }

  private async finish(): Promise<void> {
    if (this.finishing) return
    this.finishing = true
    try {
      await this.pager.drain()
      const s = await this.pager.finish()
      this.offFault()
      this.resolveComplete(s)
    } catch (err) {
      this.rejectComplete(err as Error)
    }
  }

  /** Tells the source that nothing is owed any more (after `complete`). */
  sendDone(token: number, s: PagerStats): void {
    const conv = this.conv
    conv?.trySend({
      type: 'pcdone',
      sid: conv.sid,
      token,
      faults: this.stats.faults,
      maxWaitUs: s.maxWaitUs,
      zeroFaults: s.zeroFaults,
    })
  }

  close(): void {
    this.unroute?.()
    this.offFault()
  }
}

export interface PostcopyRun {
  receiver: PostcopyReceiver
  /** The session it runs on now; undefined: start on a new one (an agent that restarted). */
  conv: Conversation | undefined
  /** The source's PeerId. */
  peer: string
  vm: string
  token: number
  ramSize: number
  chunkSize: number
  /** New sessions to the source after a link cut (the service's network and routing). */
  network?: MigrationNetwork
  register?: (sid: string, conv: Conversation) => () => void
  /** How long to wait for the source to come back, each time the link breaks. */
  budgetMs: number
  /** The guest waits for chunks and nothing arrived for this long: the session is broken (15 s). */
  stallMs?: number
  log: Logger
  signal?: AbortSignal
  /** Every new session opened (the caller closes them at the end). */
  onSession?: (conv: Conversation, unregister: () => void) => void
}

/**
 * Runs post-copy to its end on the destination: waits until every owed chunk is placed and tells the
 * source (pcdone). A broken link is waited out (the guest stalls only on what it touches of the owed
 * memory): on the next link to the source it asks to go on ('pcresume' and what is still owed).
 * Rejects with MigrationLostError when that cannot be done, MigrationTimeoutError when the source
 * stays away longer than the budget, and the pager's error when it dies.
 */
export async function runPostcopy(r: PostcopyRun): Promise<PagerStats> {
  const { receiver, log } = r
  let current = r.conv ?? (await reconnect(r))
  const stallMs = r.stallMs ?? 15_000
  for (;;) {
    // A session the source gave up on while the link stays up (it judged us dead) would leave the
    // guest waiting for ever: a guest that waits while nothing arrives for stallMs means a new session.
    const conv = current
    const watchdog = setInterval(() => {
      if (receiver.waitingCount > 0 && performance.now() - receiver.lastDataAt > stallMs)
        conv.fail(new MigrationTimeoutError('post-copy chunks the guest waits for', stallMs))
    }, 1000)
    watchdog.unref()
    const res = await Promise.race([
      receiver.complete.then((s) => ({ done: s })),
      current.whenFailed().then((e) => ({ linkError: e })),
    ]).finally(() => clearInterval(watchdog))
    if ('done' in res) {
      receiver.sendDone(r.token, res.done)
      return res.done
    }
    if (r.signal?.aborted === true) throw new AbortError(undefined, { cause: res.linkError })
    log.warn('post-copy: the link to the source broke; waiting for it', {
      vm: r.vm,
      owedBytes: receiver.remaining * r.chunkSize,
      error: describeError(res.linkError),
    })
    current.close()
    current = await reconnect(r)
    receiver.lastDataAt = performance.now()
  }
}

/** A new session to the source for this post-copy: pcresume + what is still owed; the receiver moves to it. */
async function reconnect(r: PostcopyRun): Promise<Conversation> {
  const { network, register, signal } = r
  if (network === undefined || register === undefined)
    throw new MigrationLostError(`VM '${r.vm}': the link to ${r.peer} broke during post-copy`)
  const until = performance.now() + r.budgetMs
  for (;;) {
    if (signal?.aborted === true) throw new AbortError()
    // A source outside this member's warm set of links (large meshes) gets its link back on demand.
    if (network.channel(r.peer)?.open !== true) await network.connect?.(r.peer, signal)
    const ch = network.channel(r.peer)
    if (ch?.open === true) {
      const sid = newSessionId()
      const conv = new Conversation(ch, sid)
      r.onSession?.(conv, register(sid, conv))
      try {
        await conv.send({ type: 'pcresume', sid, vm: r.vm, token: r.token }, signal)
        r.receiver.attach(conv)
        await conv.send(
          { type: 'owed', sid, chunks: r.ramSize / r.chunkSize, bitmap: r.receiver.owedBitmap() },
          signal,
        )
        // The source says it lends (or why it cannot); an agent still starting does not answer: retry.
        await conv.next(['accept'], 'the source to take up post-copy', 10_000, signal)
        r.log.info('post-copy: going on with the source', {
          vm: r.vm,
          owedBytes: r.receiver.remaining * r.chunkSize,
        })
        return conv
      } catch (err) {
        if (err instanceof AbortError) throw err
        if (err instanceof MigrationAbortedError)
          throw new MigrationLostError(`VM '${r.vm}': ${describeError(err)}`, { cause: err })
        conv.close()
      }
    }
    if (performance.now() > until)
      throw new MigrationTimeoutError(`the source ${r.peer} to come back during post-copy`, r.budgetMs)
    await new Promise((res) => setTimeout(res, 500))
  }
}

export { bitmapChunks }
