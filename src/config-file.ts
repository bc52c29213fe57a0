/**
 * The agent's configuration, in one place: every `mesh agent` / `mesh join` option can also come from a
 * JSON config file and from a MESH_* environment variable. Precedence: command-line flag, then
 * environment, then config file, then the built-in default. README "Configuration" documents the keys.
 *
 * The file: `--config FILE`, else $MESH_CONFIG, else /etc/mesh/agent.json when it exists (root) or
 * $XDG_CONFIG_HOME/mesh/agent.json (others). Unknown keys and wrong types are errors that name the file
 * and the key: a typo never silently falls back to a default.
 */
import { existsSync, readFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'
import type { Command } from 'commander'
import { MeshError } from './base/errors.ts'

export class ConfigError extends MeshError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CONFIG', exitCode: 2 })
  }
}

type Kind = 'string' | 'string[]' | 'boolean' | 'port' | 'addr?'

/** Every configurable option: its key (the option's camelCase name) and kind. */
export const AGENT_CONFIG_KEYS: Readonly<Record<string, Kind>> = {
  state: 'string',
  name: 'string',
  listen: 'string[]',
  announce: 'string[]',
  bootstrap: 'boolean',
  stunPort: 'port',
  ice: 'string[]',
  turnCredentials: 'string',
  engine: 'string',
  tap: 'string',
  address: 'string',
  pnet: 'boolean',
  direct: 'boolean',
  relayBulk: 'boolean',
  tcpCongestion: 'string',
  warmLinks: 'string',
  metrics: 'addr?',
  web: 'addr?',
}

/** `stunPort` → `MESH_STUN_PORT`. */
export const envName = (key: string): string => `MESH_${key.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`

export function defaultConfigFile(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MESH_CONFIG !== undefined && env.MESH_CONFIG !== '') return env.MESH_CONFIG
  if (process.getuid?.() === 0) return '/etc/mesh/agent.json'
  return join(env.XDG_CONFIG_HOME ?? join(homedir(), '.config'), 'mesh', 'agent.json')
}

function fromEnv(key: string, kind: Kind, raw: string): unknown {
  const name = envName(key)
  switch (kind) {
    case 'boolean':
      if (/^(1|true|yes|on)$/i.test(raw)) return true
      if (/^(0|false|no|off)$/i.test(raw)) return false
      throw new ConfigError(`${name}='${raw}' must be 1/true/yes/on or 0/false/no/off`)
    case 'string[]':
      return raw
        .split(',')
        .map((s) => s.trim())
        .filter((s) => s !== '')
    case 'port': {
      const n = Number(raw)
      if (!Number.isInteger(n) || n < 0 || n > 65535)
        throw new ConfigError(`${name}='${raw}' must be a port number`)
      return n
    }
    case 'addr?':
      // MESH_METRICS=1 turns it on at the default address, like the bare flag.
      if (/^(1|true|yes|on)$/i.test(raw)) return true
      return raw
    default:
      return raw
  }
}

function checkValue(file: string, key: string, kind: Kind, v: unknown): unknown {
  const bad = (want: string) => new ConfigError(`${file}: '${key}' must be ${want}, got ${JSON.stringify(v)}`)
  switch (kind) {
    case 'boolean':
      if (typeof v !== 'boolean') throw bad('true or false')
      return v
    case 'string[]':
      if (!Array.isArray(v) || !v.every((s) => typeof s === 'string')) throw bad('a list of strings')
      return v
    case 'port':
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 65535) throw bad('a port number')
      return v
    case 'addr?':
      if (v === true || (typeof v === 'string' && v !== '')) return v
      throw bad('true or "ADDR:PORT"')
    default:
      if (typeof v !== 'string' || v === '') throw bad('a string')
      return v
  }
}

/** Reads and checks a config file; a missing default file is an empty config, a missing named one is not. */
export function loadConfigFile(file: string, required: boolean): Record<string, unknown> {
  if (!existsSync(file)) {
    if (required) throw new ConfigError(`config file ${file} does not exist`)
    return {}
  }
  let value: unknown
  try {
    value = JSON.parse(readFileSync(file, 'utf8'))
  } catch (err) {
    throw new ConfigError(`${file}: not valid JSON (${(err as Error).message})`, { cause: err })
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new ConfigError(`${file}: must hold one JSON object`)
  const out: Record<string, unknown> = {}
  for (const [k, v] of Object.entries(value)) {
    const kind = AGENT_CONFIG_KEYS[k]
    if (kind === undefined)
      throw new ConfigError(
        `${file}: unknown key '${k}' (known: ${Object.keys(AGENT_CONFIG_KEYS).join(', ')})`,
      )
    out[k] = checkValue(file, k, kind, v)
  }
  return out
}

/**
 * Fills every option the command line did not set from the environment, then from the config file
 * (commander's value sources 'env' and 'config'). Called before the action runs.
 */
export function applyAgentConfig(cmd: Command, env: NodeJS.ProcessEnv = process.env): void {
  const given = cmd.getOptionValue('config') as string | undefined
  const file = given ?? defaultConfigFile(env)
  const config = loadConfigFile(file, given !== undefined || (env.MESH_CONFIG ?? '') !== '')
  for (const [key, kind] of Object.entries(AGENT_CONFIG_KEYS)) {
    if (cmd.getOptionValueSource(key) === 'cli') continue
    const raw = env[envName(key)]
    if (raw !== undefined && raw !== '') cmd.setOptionValueWithSource(key, fromEnv(key, kind, raw), 'env')
    else if (key in config) cmd.setOptionValueWithSource(key, config[key], 'config')
  }
}
