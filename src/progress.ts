/**
 * Progress of long operations (image push/pull, migration), rendered for people or machines:
 *   - on a terminal: one self-overwriting line with a bar, bytes, rate, ETA and any extra fields;
 *   - with `json`: one JSON object per line (`{"event":"progress",…}`), throttled, plus the final one;
 *   - otherwise (a pipe or log without --json): a plain line every few seconds.
 * Generic on purpose: an event is a phase, done/total bytes and optional extra fields.
 */
export interface ProgressEvent {
  phase: string
  doneBytes: number
  totalBytes: number
  /** Bytes per second; computed from successive events when absent. */
  rateBps?: number
  /** Milliseconds left; computed from the rate when absent. */
  etaMs?: number
  /** Any further fields (chunksSkipped, round, dirtyRateBps…), shown as `key value`. */
  [extra: string]: unknown
}

export interface ProgressOutput {
  write(s: string): unknown
  isTTY?: boolean
  columns?: number
}

export interface ProgressRenderer {
  update(ev: ProgressEvent): void
  /** Prints the final state (always, even if throttled) and ends the line. */
  done(ev?: ProgressEvent): void
}

export interface ProgressOptions {
  json?: boolean
  out?: ProgressOutput
  label?: string
  /** Minimum time between two rendered updates (default 100 ms on a TTY, 500 ms JSON, 2 s plain). */
  intervalMs?: number
  now?: () => number
}

/** Exponentially smoothed rate over successive (time, bytes) samples. */
export class RateMeter {
  private lastT: number | undefined
  private lastB = 0
  private rate = 0
  constructor(private readonly halfLifeMs = 2000) {}
  sample(t: number, bytes: number): number {
    if (this.lastT === undefined || bytes < this.lastB) {
      this.lastT = t
      this.lastB = bytes
      return this.rate
    }
    const dt = t - this.lastT
    if (dt < 50) return this.rate
    const inst = ((bytes - this.lastB) * 1000) / dt
    const w = 1 - 0.5 ** (dt / this.halfLifeMs)
    this.rate = this.rate === 0 ? inst : this.rate + w * (inst - this.rate)
    this.lastT = t
    this.lastB = bytes
    return this.rate
  }
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
export function formatBytes(n: number): string {
  let u = 0
  let v = n
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024
    u++
  }
  return `${u === 0 ? v.toFixed(0) : v.toFixed(1)} ${UNITS[u]}`
}

export function formatRate(bps: number): string {
  return `${(bps / 1e6).toFixed(1)} MB/s`
}

export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return '--'
  const s = Math.round(ms / 1000)
  if (s < 60) return `${s}s`
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`
}

function formatExtra(key: string, v: unknown): string {
  if (typeof v === 'number' && /bytes|Bytes$/.test(key)) return `${key} ${formatBytes(v)}`
  if (typeof v === 'number' && /Bps$/.test(key)) return `${key} ${formatRate(v)}`
  if (typeof v === 'number') return `${key} ${Number.isInteger(v) ? v : v.toFixed(2)}`
  return `${key} ${String(v)}`
}

/** Fills in rate and ETA from the sequence of events when the producer did not. */
function complete(
  ev: ProgressEvent,
  meter: RateMeter,
  t: number,
): ProgressEvent & { rateBps: number; etaMs: number } {
  const rate = ev.rateBps ?? meter.sample(t, ev.doneBytes)
  const left = Math.max(0, ev.totalBytes - ev.doneBytes)
  const eta = ev.etaMs ?? (rate > 0 ? (left * 1000) / rate : left === 0 ? 0 : Number.NaN)
  return { ...ev, rateBps: rate, etaMs: eta }
}

export function renderLine(
  ev: ProgressEvent & { rateBps: number; etaMs: number },
  width: number,
  label?: string,
): string {
  const { phase, doneBytes, totalBytes, rateBps, etaMs, ...rest } = ev
  const frac = totalBytes > 0 ? Math.min(1, doneBytes / totalBytes) : 0
  const extras = Object.entries(rest)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => formatExtra(k, v))
  const text = [
    `${(frac * 100).toFixed(0).padStart(3)}%`,
    `${formatBytes(doneBytes)}/${formatBytes(totalBytes)}`,
    formatRate(rateBps),
    `ETA ${formatDuration(etaMs)}`,
    ...extras,
  ].join('  ')
  const head = `${label ? `${label} ` : ''}${phase}`
  const barWidth = Math.max(10, Math.min(40, width - head.length - text.length - 5))
  const filled = Math.round(frac * barWidth)
  const line = `${head} [${'#'.repeat(filled)}${'.'.repeat(barWidth - filled)}] ${text}`
  return line.length > width ? line.slice(0, Math.max(0, width - 1)) : line
}

export function createProgressRenderer(opts: ProgressOptions = {}): ProgressRenderer {
  const out: ProgressOutput = opts.out ?? process.stderr
  const now = opts.now ?? (() => performance.now())
  const mode: 'json' | 'tty' | 'plain' = opts.json === true ? 'json' : out.isTTY === true ? 'tty' : 'plain'
  const interval = opts.intervalMs ?? (mode === 'tty' ? 100 : mode === 'json' ? 500 : 2000)
  const meter = new RateMeter()
  let lastAt = Number.NEGATIVE_INFINITY
  let lastPhase: string | undefined
  let last: ProgressEvent | undefined
  let open = false

  const render = (ev: ProgressEvent, t: number) => {
    const full = complete(ev, meter, t)
    if (mode === 'json') {
      out.write(
        `${JSON.stringify({ event: 'progress', ...full, rateBps: Math.round(full.rateBps), etaMs: Number.isFinite(full.etaMs) ? Math.round(full.etaMs) : null })}\n`,
      )
    } else if (mode === 'tty') {
      out.write(`\r\x1b[2K${renderLine(full, out.columns ?? 100, opts.label)}`)
      open = true
    } else {
      out.write(`${renderLine(full, 200, opts.label)}\n`)
    }
  }

  return {
    update(ev) {
      const t = now()
      last = ev
      // Phase changes are always shown; otherwise at most one update per interval.
      if (ev.phase === lastPhase && t - lastAt < interval) {
        meter.sample(t, ev.doneBytes)
        return
      }
      lastPhase = ev.phase
      lastAt = t
      render(ev, t)
    },
    done(ev) {
      const final = ev ?? last
      if (final !== undefined) render(final, now())
      if (open) out.write('\n')
      open = false
    },
  }
}
