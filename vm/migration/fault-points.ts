/**
 * Named points in a migration where a fault-injection test may stop or kill this process: every state
 * transition of a session (`source:<state>`, `destination:<state>`) and a few points between them
 * (`destination:final`: the source's final delta and device state arrived, the guest is paused on the
 * source; `destination:recorded`: the commit record is durable and the guest not yet resumed; for a VM
 * with a writable disk, `source:disk-bulk`: the disk's first batch went out, more follow, and
 * `destination:disk-data`: the first disk chunks are in the incoming disk).
 *
 * Inert in production: nothing here reads the environment or a file. A test agent is started with a
 * preload (test/helpers/fault-hook.mjs, through NODE_OPTIONS=--import) that installs the hook under
 * the global symbol below; without it faultPoint() is one property lookup.
 */
const HOOK = Symbol.for('mesh.migration.faultHook')

type Hook = (point: string, detail: { vm: string }) => void

export function faultPoint(point: string, vm: string): void {
  const hook = (globalThis as Record<symbol, unknown>)[HOOK]
  if (typeof hook === 'function') (hook as Hook)(point, { vm })
}
