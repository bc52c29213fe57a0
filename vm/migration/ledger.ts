/**
 * The fencing ledger of one host: everything that decides who owns a VM and must outlive the agent.
 *  - tokens: the newest fencing token seen per VM (a move carrying an older or equal one is refused);
 *  - switches: outgoing moves that reached the pause and are not settled (source side);
 *  - incoming: moves this host committed to, recorded BEFORE the guest resumes here, with what it
 *    takes to find that QEMU again, until the VM manager has adopted it (destination side);
 *  - lost: VMs whose newest copy (token N, on member X) ran and died; a copy here is older;
 *  - history: the last events per VM (in, out, lost, recovered), for `mesh vm tokens` and for
 *    answering a source that asks about an old token.
 * The file ledger writes each change durably (src/base/fs.ts) before the call returns.
 */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { readJsonObjectFile, writeFileDurable } from '../../src/base/fs.ts'
import type { VmHandle } from '../driver/interfaces.ts'
import type { SwitchRecord } from './interfaces.ts'

/** What happened to a VM's ownership on this host. */
export type TokenEventKind =
  /** The VM was committed here (token), arriving from `peer`. */
  | 'in'
  /** The VM moved to `peer` under token. */
  | 'out'
  /** The copy that ran under token (here, or on `peer`) is gone. */
  | 'lost'
  /** An older copy was resumed here by an operator's decision, under the new token. */
  | 'recovered'
  /** A committed incoming VM was re-adopted after an agent restart. */
  | 'restored'

export interface TokenEvent {
  /** ms since the epoch. */
  at: number
  token: number
  event: TokenEventKind
  /** The other member (PeerId), when there is one. */
  peer?: string
  note?: string
}

/** A move this host committed to: the guest may run here from this record on. */
export interface IncomingRecord {
  vm: string
  token: number
  /** The source's PeerId. */
  from: string
  at: number
  /** How to find the incoming QEMU again after an agent restart. */
  handle: VmHandle
}

/** The newest copy of a VM ran under `token` on member `on` (PeerId; '' = this host) and is gone. */
export interface LostRecord {
  vm: string
  token: number
  on: string
  at: number
}

/** Events kept per VM. */
export const HISTORY_LIMIT = 32

export interface FencingLedger {
  token(vm: string): number
  /** Raises the token (never lowers it). */
  setToken(vm: string, token: number): Promise<void>
  beginSwitch(record: SwitchRecord): Promise<void>
  endSwitch(vm: string): Promise<void>
  switches(): SwitchRecord[]
  /** Records (durably, before returning) that this host owns `vm` under `token`: call before resuming it. */
  commitIncoming(record: IncomingRecord): Promise<void>
  /** The incoming VM is adopted (the VM manager's record finds it from now on). */
  endIncoming(vm: string): Promise<void>
  incoming(): IncomingRecord[]
  markLost(record: LostRecord, note?: string): Promise<void>
  lost(vm: string): LostRecord | undefined
  clearLost(vm: string): Promise<void>
  record(vm: string, event: Omit<TokenEvent, 'at'>): Promise<void>
  history(vm: string): TokenEvent[]
  /** Every VM the ledger knows anything about. */
  names(): string[]
}

interface LedgerData {
  tokens: Map<string, number>
  switches: Map<string, SwitchRecord>
  incoming: Map<string, IncomingRecord>
  lost: Map<string, LostRecord>
  history: Map<string, TokenEvent[]>
}

const copy = <T extends object>(v: T): T => ({ ...v })

/**
 * The ledger's logic over a persistence callback: `persist(parts)` must have written the named parts
 * durably when it resolves. Calls are serialised, so a later state never lands before an earlier one.
 */
function ledgerOver(
  data: LedgerData,
  persist: (parts: Set<'tokens' | 'switches' | 'ledger'>) => Promise<void>,
  staleOnLoad = false,
) {
  let writing: Promise<void> = Promise.resolve()
  /** A token was raised by an event whose write did not include the tokens file (the commit's). */
  let tokensStale = staleOnLoad
  const save = (...parts: Array<'tokens' | 'switches' | 'ledger'>) => {
    if (parts.includes('tokens')) tokensStale = false
    const p = writing.then(() => persist(new Set(parts)))
    writing = p.catch(() => {})
    return p
  }
  const raise = (vm: string, token: number): boolean => {
    if (token <= (data.tokens.get(vm) ?? 0)) return false
    data.tokens.set(vm, token)
    return true
  }
  const push = (vm: string, e: TokenEvent) => {
    const list = data.history.get(vm) ?? []
    list.push(e)
    while (list.length > HISTORY_LIMIT) list.shift()
    data.history.set(vm, list)
    if (raise(vm, e.token)) tokensStale = true
  }
  const ledger: FencingLedger = {
    token: (vm) => data.tokens.get(vm) ?? 0,
    async setToken(vm, token) {
      if (raise(vm, token) || tokensStale) await save('tokens')
    },
    async beginSwitch(record) {
      data.switches.set(record.vm, copy(record))
      await save('switches')
    },
    async endSwitch(vm) {
      if (data.switches.delete(vm)) await save('switches')
    },
    switches: () => [...data.switches.values()].map(copy),
    async commitIncoming(record) {
      data.incoming.set(record.vm, copy(record))
      push(record.vm, { at: record.at, token: record.token, event: 'in', peer: record.from })
      // One durable write on the switch's critical path: the ledger (the token is derived from it on
      // load). The tokens file follows when the destination records the token after the resume.
      await save('ledger')
    },
    async endIncoming(vm) {
      if (data.incoming.delete(vm)) await save('ledger')
    },
    incoming: () => [...data.incoming.values()].map(copy),
    async markLost(record, note) {
      data.lost.set(record.vm, copy(record))
      push(record.vm, {
        at: record.at,
        token: record.token,
        event: 'lost',
        peer: record.on,
        ...(note === undefined ? {} : { note }),
      })
      await save('ledger', 'tokens')
    },
    lost: (vm) => {
      const r = data.lost.get(vm)
      return r === undefined ? undefined : copy(r)
    },
    async clearLost(vm) {
      if (data.lost.delete(vm)) await save('ledger')
    },
    async record(vm, event) {
      push(vm, { at: Date.now(), ...event })
      await save('ledger', 'tokens')
    },
    history: (vm) => (data.history.get(vm) ?? []).map(copy),
    names: () =>
      [
        ...new Set([
          ...data.tokens.keys(),
          ...data.switches.keys(),
          ...data.incoming.keys(),
          ...data.history.keys(),
        ]),
      ].sort(),
  }
  return ledger
}

const emptyData = (): LedgerData => ({
  tokens: new Map(),
  switches: new Map(),
  incoming: new Map(),
  lost: new Map(),
  history: new Map(),
})

/** A ledger kept in memory (tests, benchmarks, hosts without a state dir). */
export function createMemoryLedger(): FencingLedger {
  return ledgerOver(emptyData(), async () => {})
}

const isObj = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v)
const isToken = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0

function isSwitchRecord(v: unknown): v is SwitchRecord {
  return (
    isObj(v) &&
    typeof v.vm === 'string' &&
    typeof v.to === 'string' &&
    typeof v.at === 'number' &&
    isToken(v.token)
  )
}
function isIncoming(v: unknown): v is IncomingRecord {
  return (
    isObj(v) &&
    typeof v.vm === 'string' &&
    typeof v.from === 'string' &&
    typeof v.at === 'number' &&
    isToken(v.token) &&
    isObj(v.handle) &&
    typeof v.handle.pid === 'number' &&
    typeof v.handle.memoryPath === 'string' &&
    isObj(v.handle.paths) &&
    isObj(v.handle.spec)
  )
}
function isLost(v: unknown): v is LostRecord {
  return (
    isObj(v) &&
    typeof v.vm === 'string' &&
    typeof v.on === 'string' &&
    typeof v.at === 'number' &&
    isToken(v.token)
  )
}
function isEvent(v: unknown): v is TokenEvent {
  return (
    isObj(v) &&
    typeof v.at === 'number' &&
    isToken(v.token) &&
    ['in', 'out', 'lost', 'recovered', 'restored'].includes(v.event as string) &&
    (v.peer === undefined || typeof v.peer === 'string') &&
    (v.note === undefined || typeof v.note === 'string')
  )
}

/** File names under the state dir (migration-tokens.json and migration-switches.json predate the ledger). */
export const LEDGER_FILES = {
  tokens: 'migration-tokens.json',
  switches: 'migration-switches.json',
  ledger: 'migration-ledger.json',
} as const

/** The agent's ledger: three files under `stateDir`, each change written durably. */
export async function createFileLedger(stateDir: string): Promise<FencingLedger> {
  const data = emptyData()
  const path = (k: keyof typeof LEDGER_FILES) => join(stateDir, LEDGER_FILES[k])
  for (const [k, v] of Object.entries(await readJsonObjectFile(path('tokens'))))
    if (isToken(v)) data.tokens.set(k, v)
  for (const [k, v] of Object.entries(await readJsonObjectFile(path('switches'))))
    if (isSwitchRecord(v) && v.vm === k)
      data.switches.set(k, {
        vm: v.vm,
        token: v.token,
        to: v.to,
        at: v.at,
        // A post-copy switch: the copy here must be kept until the destination has all its memory.
        ...(v.mode === 'postcopy' ? { mode: 'postcopy' as const } : {}),
      })
  const l = await readJsonObjectFile(path('ledger'))
  for (const [k, v] of Object.entries(isObj(l.incoming) ? l.incoming : {}))
    if (isIncoming(v) && v.vm === k) data.incoming.set(k, v)
  for (const [k, v] of Object.entries(isObj(l.lost) ? l.lost : {}))
    if (isLost(v) && v.vm === k) data.lost.set(k, v)
  for (const [k, v] of Object.entries(isObj(l.history) ? l.history : {}))
    if (Array.isArray(v)) data.history.set(k, v.filter(isEvent).slice(-HISTORY_LIMIT))
  // The newest token is the highest anything recorded: a commit record or an event may be newer than
  // the tokens file (the commit writes the ledger only).
  let stale = false
  const raise = (vm: string, t: number) => {
    if (t <= (data.tokens.get(vm) ?? 0)) return
    data.tokens.set(vm, t)
    stale = true
  }
  for (const r of data.incoming.values()) raise(r.vm, r.token)
  for (const r of data.lost.values()) raise(r.vm, r.token)
  for (const [vm, list] of data.history) for (const e of list) raise(vm, e.token)

  return ledgerOver(
    data,
    async (parts) => {
      await mkdir(stateDir, { recursive: true, mode: 0o700 })
      if (parts.has('tokens'))
        await writeFileDurable(path('tokens'), JSON.stringify(Object.fromEntries(data.tokens)))
      if (parts.has('switches'))
        await writeFileDurable(path('switches'), JSON.stringify(Object.fromEntries(data.switches)))
      if (parts.has('ledger'))
        await writeFileDurable(
          path('ledger'),
          JSON.stringify({
            version: 1,
            incoming: Object.fromEntries(data.incoming),
            lost: Object.fromEntries(data.lost),
            history: Object.fromEntries(data.history),
          }),
        )
    },
    stale,
  )
}
