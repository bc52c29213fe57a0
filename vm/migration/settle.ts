/**
 * Settling a switch whose outcome the source does not know. Past the commit the source may neither
 * resume its paused copy nor throw it away until the destination says whether it resumed; and a source
 * agent killed anywhere after the pause leaves a paused QEMU behind (it outlives the agent) that the
 * next agent must not simply resume. Both cases end here: ask the destination (on the current link or
 * the next one that opens) until it answers, then stop our copy (it runs there) or resume it (it never
 * will). The destination resumes only after a commit, and a session whose link died before the commit
 * arrived is discarded, so its answer is final.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import { AbortError, describeError, throwIfAborted } from '../../src/base/errors.ts'
import type { Logger } from '../../src/base/log.ts'
import { Conversation } from './conversation.ts'
import { MigrationInDoubtError, MigrationLinkError, MigrationTimeoutError } from './errors.ts'
import type { MigrationChannel, MigrationNetwork, SwitchRecord, VmHost } from './interfaces.ts'
import { newSessionId } from './v1/messages.ts'

/** What the destination said about a VM under a token; undefined = no answer yet. 'lost': it ran the VM
 *  under that token and that copy is gone (ours is older). 'postcopy': it runs there but still needs
 *  memory only our copy holds (#15: keep ours, paused, and lend it). */
export type DestinationState = 'running' | 'discarded' | 'absent' | 'lost' | 'postcopy'

export interface AskInit {
  network: MigrationNetwork
  /** The service routes the reply to the conversation registered under its session id. */
  register(sid: string, conv: Conversation): () => void
  signal?: AbortSignal
}

/**
 * Asks `to` once whether it runs `vm` under `token`. Resolves undefined when there is no open link,
 * no reply within `timeoutMs`, or the destination is still finishing that session ('pending').
 */
export async function askDestination(
  init: AskInit,
  to: string,
  vm: string,
  token: number,
  timeoutMs: number,
): Promise<DestinationState | undefined> {
  throwIfAborted(init.signal)
  const ch: MigrationChannel | undefined = init.network.channel(to)
  if (ch?.open !== true) return undefined
  const sid = newSessionId()
  const conv = new Conversation(ch, sid)
  const unregister = init.register(sid, conv)
  try {
    await conv.send({ type: 'query', sid, vm, token }, init.signal)
    const r = await conv.next(['query-reply'], 'query-reply', timeoutMs, init.signal)
    if (r.state === 'running' && r.token >= token) return 'running'
    if (r.state === 'postcopy' && r.token >= token) return 'postcopy'
    if (r.state === 'discarded' || r.state === 'absent' || r.state === 'lost') return r.state
    return undefined
  } catch (err) {
    if (err instanceof AbortError) throw err
    if (err instanceof MigrationTimeoutError || err instanceof MigrationLinkError) return undefined
    throw err
  } finally {
    unregister()
    conv.close()
  }
}

const pause = (ms: number, signal?: AbortSignal) =>
  sleep(ms, undefined, signal ? { signal } : {}).catch(() => {})

/**
 * Asks until the destination answers or `budgetMs` runs out (then MigrationInDoubtError: the caller
 * keeps the VM paused and hands the switch to settleSwitch()).
 */
export async function resolveInDoubt(
  init: AskInit,
  to: string,
  vm: string,
  token: number,
  budgetMs: number,
): Promise<DestinationState> {
  const until = performance.now() + budgetMs
  while (performance.now() < until) {
    const left = Math.max(1000, Math.min(5000, until - performance.now()))
    const answer = await askDestination(init, to, vm, token, left)
    if (answer !== undefined) return answer
    await pause(200, init.signal)
  }
  throwIfAborted(init.signal)
  throw new MigrationInDoubtError(
    `VM '${vm}': the destination ${to} got the commit for token ${token} but cannot be reached to say whether it resumed; the VM stays paused here so that two copies never run, until ${to} answers (this host keeps asking)`,
  )
}

export interface SettleInit extends AskInit {
  host: VmHost
  log: Logger
  record: SwitchRecord
  /** Longest wait between two questions (default 5 s; starts at 250 ms). */
  maxIntervalMs?: number
  /** A signal that cuts the current wait short (someone wants the answer now: ask again at once). */
  wake?: () => AbortSignal
}

/** What an operator reads when the newest copy of a VM is gone and an older one waits here. */
export function lostMessage(vm: string, token: number, on: string, here: string): string {
  return `VM '${vm}' ran on ${on} (fencing token ${token}) and that copy is gone; the older copy on ${here} stays paused so that nothing older quietly replaces it. To resume it, accepting the loss of what ran on ${on}: mesh vm recover ${vm} --accept-loss (on ${here}); history on every member: mesh vm tokens ${vm}`
}

/** Records on this (source) host that the copy under `token` on `on` is lost; ends the switch record. */
export async function recordLoss(
  host: VmHost,
  log: Logger,
  vm: string,
  token: number,
  on: string,
): Promise<void> {
  log.error('the destination ran the VM and lost it: the older copy here stays paused', {
    vm,
    on,
    fence: token,
  })
  await host.ledger.markLost({ vm, token, on, at: Date.now() })
  await host.endSwitch(vm)
}

/**
 * Settles one switch for good: asks the destination (backing off up to maxIntervalMs, for as long as
 * it takes: until then our copy stays paused, which is the safe side) and then
 * - 'running': the destination owns the VM under the token: record the token, stop our copy (if it is
 *   still here) and forget it;
 * - 'discarded' / 'absent': the destination never resumed and never will: resume our copy;
 * - 'lost': the destination ran it and its copy is gone: ours is older; it stays paused and the loss is
 *   recorded (an operator resumes it with `mesh vm recover`);
 * - 'postcopy': it runs there and still needs memory from our copy: keep it (the record stays; the
 *   service lends the rest when the destination comes back, then lets go).
 * Ends the switch record either way. Rejects only when the signal fires (the service stops; the record
 * stays for the next start).
 */
export async function settleSwitch(
  init: SettleInit,
): Promise<'moved' | 'resumed' | 'gone' | 'lost' | 'lent'> {
  const { host, log, record } = init
  const name = record.vm
  const maxInterval = init.maxIntervalMs ?? 5000
  let interval = 250
  let answer: DestinationState | undefined
  for (;;) {
    answer = await askDestination(init, record.to, name, record.token, 5000)
    if (answer !== undefined) break
    const woken = init.wake?.()
    await pause(
      interval,
      woken === undefined
        ? init.signal
        : AbortSignal.any([init.signal, woken].filter((s) => s !== undefined)),
    )
    throwIfAborted(init.signal)
    interval = woken?.aborted === true ? 250 : Math.min(maxInterval, interval * 2)
  }
  const vm = host.get(name)
  if (answer === 'postcopy') {
    // It runs there on memory partly still here: keep our paused copy (and the record). The destination
    // comes back for the rest ('pcresume'); the service lends it and lets go of our copy after.
    log.warn('the VM runs on the destination, which still needs memory from the copy here: keeping it', {
      vm: name,
      to: record.to,
      fence: record.token,
    })
    return 'lent'
  }
  if (answer === 'running') {
    await host.setToken(name, record.token)
    await host.ledger.record(name, { token: record.token, event: 'out', peer: record.to, note: 'settled' })
    if (vm !== undefined) {
      log.warn('the VM runs on the destination: stopping the copy left here', {
        vm: name,
        to: record.to,
        fence: record.token,
        status: vm.status(),
      })
      await vm.stop()
    }
    await host.release(name)
    await host.endSwitch(name)
    return 'moved'
  }
  if (answer === 'lost') {
    await recordLoss(host, log, name, record.token, record.to)
    return 'lost'
  }
  if (vm === undefined) {
    log.error('the destination never resumed the VM and no copy is left here', {
      vm: name,
      to: record.to,
      answer,
    })
    await host.endSwitch(name)
    return 'gone'
  }
  if (vm.status() === 'paused') {
    log.warn('the destination never resumed the VM: resuming it here', { vm: name, to: record.to, answer })
    try {
      await vm.resume(init.signal)
    } catch (err) {
      if (err instanceof AbortError) throw err
      log.error('resuming the VM failed', { vm: name, error: describeError(err) })
    }
  }
  await host.endSwitch(name)
  return 'resumed'
}
