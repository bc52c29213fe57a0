/**
 * A small leveled logger: one line per record, `time level component: message key=value…`.
 * Values are passed separately from the message so secrets can be redacted by key name, never by
 * hoping the caller remembered.
 */
export type Level = 'debug' | 'info' | 'warn' | 'error'
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 }
const SECRET_KEY = /(secret|private|password|credential|psk|token|invite)/i

export type Fields = Record<string, unknown>

export interface Logger {
  debug(msg: string, fields?: Fields): void
  info(msg: string, fields?: Fields): void
  warn(msg: string, fields?: Fields): void
  error(msg: string, fields?: Fields): void
  child(component: string): Logger
}

export interface LoggerInit {
  level?: Level
  component?: string
  sink?: (line: string) => void
}

function formatValue(key: string, value: unknown): string {
  if (SECRET_KEY.test(key)) return '[redacted]'
  if (value instanceof Error) return JSON.stringify(value.message)
  if (typeof value === 'string') return /^[\w.:/@-]*$/.test(value) ? value : JSON.stringify(value)
  return JSON.stringify(value) ?? 'undefined'
}

export function formatRecord(level: Level, component: string, msg: string, fields: Fields = {}): string {
  const kv = Object.entries(fields)
    .map(([k, v]) => `${k}=${formatValue(k, v)}`)
    .join(' ')
  return `${new Date().toISOString()} ${level.toUpperCase().padEnd(5)} ${component}: ${msg}${kv ? ` ${kv}` : ''}`
}

export function createLogger(init: LoggerInit = {}): Logger {
  const envLevel = process.env.MESH_LOG as Level | undefined
  const min = ORDER[init.level ?? (envLevel !== undefined && envLevel in ORDER ? envLevel : 'info')]
  const sink = init.sink ?? ((line: string) => process.stderr.write(`${line}\n`))
  const make = (component: string): Logger => {
    const at =
      (level: Level) =>
      (msg: string, fields?: Fields): void => {
        if (ORDER[level] >= min) sink(formatRecord(level, component, msg, fields))
      }
    return {
      debug: at('debug'),
      info: at('info'),
      warn: at('warn'),
      error: at('error'),
      child: (sub) => make(`${component}/${sub}`),
    }
  }
  return make(init.component ?? 'mesh')
}

/** A logger that drops everything (tests, library defaults). */
export const silentLogger: Logger = createLogger({ sink: () => {} })
