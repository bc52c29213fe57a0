/**
 * The source's side of post-copy: the guest runs on the destination and its paused copy here holds the
 * chunks it has not received yet (the owed set). The lender answers the destination's page requests
 * (pcwant) first and pushes the rest in the background, hottest first, keeping a window of background
 * bytes unacknowledged so that an urgent chunk never waits behind many (the migrate channel is one
 * ordered stream).
 *
 * The window is sized from the acknowledgements, delay-based: it starts at `windowBytes` and grows by
 * what each acknowledgement releases (doubling per round trip) while the round trip of a chunk stays
 * within `queueTargetMs` of the lowest seen (the link is not full yet), and shrinks by an eighth per round
 * trip when the queue behind it costs an urgent chunk more than three times that. A window fixed at the
 * start (2 × the bulk copy's bandwidth-delay product) capped the background push far below the link when
 * the bulk copy had measured a low rate (a standby move sends little; the link sat idle while scanning):
 * 512 KiB per 30 ms round trip is ~15 MB/s, and a 300 MB owed set then took 15 s, past a spot notice.
 *
 * A lender outlives a link: when its conversation fails it waits for the destination to come back with
 * 'pcresume' on a new session (attach()), and goes on from the owed bitmap the destination sends then.
 * It reads the paused copy's RAM file, which never changes while the guest is paused here.
 */
import { closeSync, openSync, readSync } from 'node:fs'
import { AbortError, describeError, throwIfAborted } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import type { Conversation } from './conversation.ts'
import {
  MigrationAbortedError,
  MigrationDecodeError,
  MigrationLinkError,
  MigrationTimeoutError,
} from './errors.ts'
import type { MigrationReport } from './interfaces.ts'
import { PAGE_SIZE } from './ram.ts'
import { type EncodedChunk, encodeMessage, type Message, PAGE_LITERAL, PAGE_ZERO } from './v1/messages.ts'

type PcDone = Extract<Message, { type: 'pcdone' }>

export interface LenderInit {
  ramPath: string
  ramSize: number
  chunkSize: number
  /** Owed chunks in the order the background sends them (hottest first). */
  order: number[]
  /** Background bytes in flight at the start and at least (urgent chunks are never held back by it). */
  windowBytes: number
  /** The window grows no further (default 16 MiB: ~240 ms of queue for an urgent chunk at 70 MB/s). */
  maxWindowBytes?: number
  /** Queueing delay the window may add to an urgent chunk's round trip before it stops growing (40 ms). */
  queueTargetMs?: number
  log: Logger
  signal?: AbortSignal
}

export interface LenderStats {
  owedChunks: number
  /** Chunks sent because the guest asked for them, and in the background. */
  urgentChunks: number
  backgroundChunks: number
  bytes: number
  /** Sessions the lender served on (more than one after a link cut). */
  sessions: number
  /** The window at the end and its largest, bytes. */
  windowBytes: number
  maxWindowBytes: number
  /** Round trip of a chunk (sent → acknowledged placed): lowest and last seen, ms. */
  minAckRttMs: number
  lastAckRttMs: number
  /** Time the background push waited on a full window while owed chunks were left, ms. */
  windowWaitMs: number
}

/** The bitmap (one bit per chunk) of a list of chunks. */
export function chunkBitmap(chunks: Iterable<number>, count: number): Uint8Array {
  const b = new Uint8Array(Math.ceil(count / 8))
  for (const c of chunks) b[c >> 3]! |= 1 << (c & 7)
  return b
}

/** The chunks a bitmap names. */
export function bitmapChunks(bitmap: Uint8Array, count: number): number[] {
  const out: number[] = []
  for (let c = 0; c < count; c++) if ((bitmap[c >> 3]! >> (c & 7)) & 1) out.push(c)
  return out
}

export class PostcopyLender {
  readonly stats: LenderStats
  private readonly chunkCount: number
  /** Still owed (not placed as far as the destination last said), and the order to send them in. */
  private owed: Set<number>
  /** Every chunk owed at the switch (a destination coming back may still lack only these). */
  private readonly everOwed: ReadonlySet<number>
  private order: number[]
  private next = 0
  private readonly urgent: number[] = []
  /** Sent on the current session, in order; `placed` of them acknowledged. */
  private sentOnSession = 0
  private placed = 0
  /** When each chunk of the session went out (performance.now(), by its number on the session). */
  private sentAt: number[] = []
  private window: number
  private minRtt = Number.POSITIVE_INFINITY
  private lastShrink = 0
  private backgroundSince = 0
  private background = false
  private conv: Conversation | undefined
  private unroute: (() => void) | undefined
  private wake: (() => void) | undefined
  private readonly fd: number
  private closed = false
  readonly done: Promise<PcDone>
  private resolveDone!: (m: PcDone) => void
  private rejectDone!: (e: Error) => void

  constructor(private readonly init: LenderInit) {
    this.chunkCount = init.ramSize / init.chunkSize
    this.owed = new Set(init.order)
    this.everOwed = new Set(init.order)
    this.order = [...init.order]
    this.window = init.windowBytes
    this.stats = {
      owedChunks: this.owed.size,
      urgentChunks: 0,
      backgroundChunks: 0,
      bytes: 0,
      sessions: 0,
      windowBytes: init.windowBytes,
      maxWindowBytes: init.windowBytes,
      minAckRttMs: 0,
      lastAckRttMs: 0,
      windowWaitMs: 0,
    }
    this.fd = openSync(init.ramPath, 'r')
    this.done = new Promise<PcDone>((resolve, reject) => {
      this.resolveDone = resolve
      this.rejectDone = reject
    })
    this.done.catch(() => {})
  }

  get remaining(): number {
    return this.owed.size
  }

  /** The conversation it serves on now. */
  get current(): Conversation | undefined {
    return this.conv
  }

  /**
   * Serves on a conversation (the session's own, or a new one after 'pcresume' with the destination's
   * current owed bitmap). The previous conversation, if any, is dropped.
   */
  attach(conv: Conversation, owedBitmap?: Uint8Array): void {
    this.unroute?.()
    this.conv = conv
    this.stats.sessions++
    this.sentOnSession = 0
    this.placed = 0
    this.sentAt = []
    this.urgent.length = 0
    if (owedBitmap !== undefined) {
      // What the destination still lacks is the truth now (chunks in flight on the dead link are lost).
      const still = new Set(bitmapChunks(owedBitmap, this.chunkCount))
      for (const c of still)
        if (!this.everOwed.has(c)) throw new MigrationDecodeError(`pcresume: chunk ${c} was never owed`)
      this.owed = still
      // Chunks sent on the dead link but never placed are owed again, in their old place in the order.
      this.order = [...this.everOwed].filter((c) => still.has(c))
      const rank = new Map(this.init.order.map((c, i) => [c, i]))
      this.order.sort((a, b) => rank.get(a)! - rank.get(b)!)
      this.next = 0
    }
    this.unroute = conv.route(['pcwant', 'pcack', 'pcdone'], (m) => this.onMessage(m))
    this.kick()
  }

  /** From now on the owed chunks nobody asked for go too (the guest runs on the destination). */
  startBackground(): void {
    this.background = true
    this.backgroundSince = performance.now()
    this.kick()
  }

  private kick(): void {
    const w = this.wake
    this.wake = undefined
    w?.()
  }

  private onMessage(m: Message): void {
    if (m.type === 'pcwant') {
      for (const c of m.indices) if (this.owed.has(c) && c >= 0 && c < this.chunkCount) this.urgent.push(c)
    } else if (m.type === 'pcack') {
      if (m.placed > this.placed) {
        const released = m.placed - this.placed
        this.placed = m.placed
        const sent = this.sentAt[m.placed - 1]
        if (sent !== undefined) this.sizeWindow(performance.now() - sent, released)
      }
    } else if (m.type === 'pcdone') {
      this.resolveDone(m)
    }
    this.kick()
  }

  /** Delay-based window: grow while the round trip shows no queue, shrink when the queue is long. */
  private sizeWindow(rttMs: number, releasedChunks: number): void {
    const { chunkSize, windowBytes } = this.init
    const max = this.init.maxWindowBytes ?? 16 * 1024 * 1024
    const target = this.init.queueTargetMs ?? 40
    const now = performance.now()
    this.minRtt = Math.min(this.minRtt, rttMs)
    this.stats.minAckRttMs = Math.round(this.minRtt * 10) / 10
    this.stats.lastAckRttMs = Math.round(rttMs * 10) / 10
    if (rttMs <= this.minRtt + target) this.window = Math.min(max, this.window + releasedChunks * chunkSize)
    else if (rttMs > this.minRtt + 3 * target && now - this.lastShrink > rttMs) {
      this.lastShrink = now
      this.window = Math.max(windowBytes, Math.round((this.window * 7) / 8))
    }
    this.stats.windowBytes = this.window
    this.stats.maxWindowBytes = Math.max(this.stats.maxWindowBytes, this.window)
  }

  /**
   * Sends until every owed chunk went out on the current conversation; resolves then (pcdone may still
   * be on its way: await `done`). Rejects when the conversation fails (attach a new one and call again).
   */
  async pump(): Promise<void> {
    const conv = this.conv
    if (conv === undefined) throw new Error('PostcopyLender.pump() before attach()')
    const { signal, chunkSize } = this.init
    const failed = conv.whenFailed()
    for (;;) {
      throwIfAborted(signal)
      if (conv.failed !== undefined) throw conv.failed
      let chunk: number | undefined
      let urgent = false
      while (this.urgent.length > 0) {
        const c = this.urgent.shift()!
        if (this.owed.has(c)) {
          chunk = c
          urgent = true
          break
        }
      }
      const inflight = (this.sentOnSession - this.placed) * chunkSize
      if (chunk === undefined && this.background && inflight < this.window) {
        while (this.next < this.order.length && !this.owed.has(this.order[this.next]!)) this.next++
        chunk = this.order[this.next]
      }
      if (chunk === undefined) {
        if (this.owed.size === 0) {
          this.logSent()
          return
        }
        const full = this.background && this.next < this.order.length
        const t0 = performance.now()
        await Promise.race([new Promise<void>((r) => (this.wake = r)), failed])
        if (full) this.stats.windowWaitMs += performance.now() - t0
        continue
      }
      this.owed.delete(chunk)
      const msg = encodeMessage({ type: 'pcdata', sid: conv.sid, chunks: [this.encode(chunk)] })
      if (urgent) this.stats.urgentChunks++
      else this.stats.backgroundChunks++
      this.stats.bytes += msg.byteLength
      this.sentAt[this.sentOnSession++] = performance.now()
      await conv.sendRaw(msg, signal)
    }
  }

  /** Where the background push's time went (the post-copy tail's first suspect). */
  private logSent(): void {
    const ms = this.backgroundSince === 0 ? 0 : performance.now() - this.backgroundSince
    const st = this.stats
    this.init.log.info('post-copy: every owed chunk sent', {
      owedBytes: st.owedChunks * this.init.chunkSize,
      ms: Math.round(ms),
      mbps: ms > 0 ? Math.round(st.bytes / 1000 / ms) : 0,
      urgentChunks: st.urgentChunks,
      backgroundChunks: st.backgroundChunks,
      windowStartBytes: this.init.windowBytes,
      windowBytes: st.windowBytes,
      maxWindowBytes: st.maxWindowBytes,
      minAckRttMs: st.minAckRttMs,
      lastAckRttMs: st.lastAckRttMs,
      windowWaitMs: Math.round(st.windowWaitMs),
    })
  }

  /** One chunk of the paused copy: zero pages as such, the rest literal. */
  private encode(index: number): EncodedChunk {
    const { chunkSize } = this.init
    const buf = Buffer.allocUnsafe(chunkSize)
    let got = 0
    while (got < chunkSize) {
      const n = readSync(this.fd, buf, got, chunkSize - got, index * chunkSize + got)
      if (n === 0) {
        buf.fill(0, got)
        break
      }
      got += n
    }
    const pages = chunkSize / PAGE_SIZE
    const kinds = new Uint8Array(pages)
    const lits: Buffer[] = []
    for (let p = 0; p < pages; p++) {
      const page = buf.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)
      if (isZeroPage(page)) kinds[p] = PAGE_ZERO
      else {
        kinds[p] = PAGE_LITERAL
        lits.push(page)
      }
    }
    return {
      index,
      deflated: false,
      kinds,
      refs: [],
      literal: lits.length === pages ? buf : Buffer.concat(lits),
    }
  }

  /** Waits for the destination's pcdone (after pump() sent everything). */
  async finished(timeoutMs: number): Promise<PcDone> {
    const conv = this.conv
    let timer: NodeJS.Timeout | undefined
    try {
      return await Promise.race([
        this.done,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new MigrationTimeoutError('pcdone', timeoutMs)), timeoutMs)
        }),
        ...(conv === undefined ? [] : [conv.whenFailed().then((e) => Promise.reject(e))]),
      ])
    } finally {
      clearTimeout(timer)
    }
  }

  close(err?: Error): void {
    if (this.closed) return
    this.closed = true
    this.unroute?.()
    closeSync(this.fd)
    if (err !== undefined) this.rejectDone(err)
  }
}

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE)
function isZeroPage(p: Buffer): boolean {
  return p.equals(ZERO_PAGE)
}

/** Rejects with MigrationTimeoutError when `p` takes longer than `ms`. */
async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new MigrationTimeoutError(what, ms)), ms)
      }),
    ])
  } finally {
    clearTimeout(timer)
  }
}

export interface LendInit {
  vm: string
  token: number
  to: string
  /** The destination's name for messages. */
  toName: string
  /** The pump started at the switch (the first session's), if any. */
  pumping?: Promise<void>
  /** Resolves when the destination comes back for this VM and token on a new session (the service's). */
  awaitResume?: (
    vm: string,
    token: number,
    signal?: AbortSignal,
  ) => Promise<{ conv: Conversation; bitmap: Uint8Array }>
  /** Each session the destination came back on (the caller closes them). */
  onResumed(conv: Conversation): void
  /** How long to wait for pcdone once everything went out. */
  finishMs: number
  /** How long to wait for a destination whose link broke to come back. */
  resumeMs: number
  chunkSize: number
  log: Logger
  signal: AbortSignal
}

/**
 * The source's post-copy phase (moved out of source.ts): lends until the destination says every owed
 * chunk is placed, and returns its pcdone. A broken link is waited out: the destination comes back with
 * 'pcresume' on a new session and the lender goes on from what it still lacks.
 */
export async function lendUntilPlaced(lender: PostcopyLender, o: LendInit): Promise<PcDone> {
  const comeback = `the destination ${o.toName} to come back for the rest of its memory`
  let pumping = o.pumping
  lender.startBackground()
  for (;;) {
    // The destination may come back on a new session at any time: after a link cut both ends see,
    // or when it judged ours dead while we did not (then ours is dropped for the new one).
    const stopWaiting = new AbortController()
    const resume = o.awaitResume?.(o.vm, o.token, AbortSignal.any([o.signal, stopWaiting.signal]))
    resume?.catch(() => {})
    const work = (async () => {
      await (pumping ?? lender.pump())
      return lender.finished(o.finishMs)
    })()
    work.catch(() => {})
    const r = await Promise.race([
      work.then(
        (done) => ({ done }),
        (err: unknown) => ({ err }),
      ),
      ...(resume === undefined ? [] : [resume.then((back) => ({ back }))]),
    ])
    pumping = undefined
    if ('done' in r) {
      stopWaiting.abort()
      return r.done
    }
    let back: { conv: Conversation; bitmap: Uint8Array }
    if ('back' in r) back = r.back
    else {
      const err = r.err
      // Our own abort, the destination's (it lost the VM), or nobody to wait for: no going on.
      if (err instanceof AbortError || err instanceof MigrationAbortedError || resume === undefined) {
        stopWaiting.abort()
        throw err
      }
      o.log.warn('post-copy: the link to the destination broke; waiting for it to come back', {
        vm: o.vm,
        to: o.to,
        owedBytes: lender.remaining * o.chunkSize,
        error: describeError(err),
      })
      back = await withTimeout(resume, o.resumeMs, comeback).catch((e: unknown) => {
        stopWaiting.abort()
        throw e
      })
    }
    lender.current?.fail(new MigrationLinkError('post-copy went on on a new session'))
    o.onResumed(back.conv)
    lender.attach(back.conv, back.bitmap)
    o.log.info('post-copy: the destination is back', {
      vm: o.vm,
      owedBytes: lender.remaining * o.chunkSize,
    })
  }
}

/** The report's post-copy part: what was owed, how long lending took, what the destination counted. */
export function postcopyReport(
  lender: PostcopyLender,
  done: PcDone | undefined,
  startedPerf: number,
  chunkSize: number,
): NonNullable<MigrationReport['postcopy']> {
  return {
    owedBytes: lender.stats.owedChunks * chunkSize,
    ms: Math.round(performance.now() - startedPerf),
    faults: done?.faults ?? 0,
    maxFaultWaitMs: Math.round((done?.maxWaitUs ?? 0) / 1000),
    zeroFaults: done?.zeroFaults ?? 0,
    urgentChunks: lender.stats.urgentChunks,
    backgroundChunks: lender.stats.backgroundChunks,
    sessions: lender.stats.sessions,
  }
}
