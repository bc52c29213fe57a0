/**
 * QEMU's own storage + memory migration of a running VM, done the way libvirt's
 * `virsh migrate --live --copy-storage-all` drives QEMU (qemu_migration.c), as the baseline of
 * `bench disk`:
 *
 *   destination: a QEMU with the source's arguments and `-incoming defer`, on a new empty disk of the
 *     same virtual size (copy-storage-all: no backing file), QEMU's NBD server exporting that disk
 *     writable, `migrate-incoming` on TCP;
 *   source: the destination's export as a block node, `blockdev-mirror sync=full` onto it; once the
 *     mirror is ready, `migrate` (RAM in the stream: x-ignore-shared off) with `pause-before-switchover`
 *     (libvirt always sets it); in `pre-switchover` (guest paused) the mirror is cancelled, which for a
 *     ready mirror means "finish copying, then stop"; then `migrate-continue`;
 *   destination: once the migration completed, the NBD server stops and the guest is resumed (`cont`).
 *
 * Times come from QEMU's own event timestamps (source `STOP` → destination `RESUME` is the downtime, both
 * on this host's clock), bytes from the destination host's interface counters (what crossed the wire,
 * headers included), like the mesh move it is compared with.
 */
import { readdir, readFile } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Host } from '../../fixtures/testnet/clouds.ts'
import { QmpClient as Qmp, type QmpClient, type QmpEvent } from '../../vm/qemu/qmp.ts'

export interface QemuProcess {
  pid: number
  args: string[]
}

/** The QEMU process whose command line mentions `needle` (e.g. the VM's run dir), or undefined. */
export async function findQemu(needle: string): Promise<QemuProcess | undefined> {
  for (const name of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(name)) continue
    const raw = await readFile(`/proc/${name}/cmdline`).catch(() => undefined)
    if (raw === undefined || raw.length === 0) continue
    const args = raw.toString('utf8').split('\0')
    if (args.at(-1) === '') args.pop()
    if (!/qemu-system/.test(args[0] ?? '')) continue
    if (args.some((a) => a.includes(needle))) return { pid: Number(name), args: args.slice(1) }
  }
  return undefined
}

/** The value of `key=` inside a QEMU option string (`a=b,key=v,…`; `,,` is a literal comma). */
export function optionValue(opt: string, key: string): string | undefined {
  const parts = opt.split(/,(?!,)/)
  for (const p of parts) if (p.startsWith(`${key}=`)) return p.slice(key.length + 1).replaceAll(',,', ',')
  return undefined
}

function replaceOption(opt: string, key: string, value: string): string {
  const v = value.replaceAll(',', ',,')
  return opt.replace(new RegExp(`(^|,)${key}=(?:[^,]|,,)*`), `$1${key}=${v}`)
}

export interface DestinationPaths {
  ram: string
  qmp: string
  console: string
  net: string
  disk: string
}

/**
 * The destination's arguments: the source's, with this host's own files (RAM, QMP, console, NIC socket,
 * disk) and `-incoming defer`. Device and machine options stay exactly as they are (they must match).
 */
export function destinationArgs(src: string[], p: DestinationPaths): string[] {
  const out: string[] = []
  for (let i = 0; i < src.length; i++) {
    const a = src[i]!
    const v = src[i + 1]
    if (v === undefined || !a.startsWith('-')) {
      out.push(a)
      continue
    }
    let nv = v
    if (a === '-object' && v.startsWith('memory-backend-file')) nv = replaceOption(v, 'mem-path', p.ram)
    else if (a === '-qmp') nv = `unix:${p.qmp.replaceAll(',', ',,')},server=on,wait=off`
    else if (a === '-chardev' && v.startsWith('file,')) nv = replaceOption(v, 'path', p.console)
    else if (a === '-netdev' && v.startsWith('stream,')) nv = replaceOption(v, 'addr.path', p.net)
    else if (a === '-drive' && v.includes('node-name=vol0')) nv = replaceOption(v, 'file', p.disk)
    else if (a === '-incoming') {
      i++
      continue
    }
    out.push(a, nv)
    i++
  }
  out.push('-incoming', 'defer')
  return out
}

export interface QemuMoveResult {
  totalMs: number
  downtimeMs: number
  /** Bytes into + out of the destination host's interface while the move ran. */
  wireBytes: number
  /** What QEMU says its migration stream carried (RAM and device state; not the mirror). */
  migrationStreamBytes: number
  /** Mirror job: bytes it copied (its `offset` at completion). */
  mirrorBytes: number
  /** Time from the mirror start to it being ready (the bulk copy). */
  mirrorReadyMs: number
  /** Source STOP → pre-switchover mirror completion. */
  mirrorFinalMs: number
}

function eventMs(e: QmpEvent): number {
  const t = e.timestamp
  if (t === undefined) return Number.NaN
  return t.seconds * 1000 + t.microseconds / 1000
}

async function waitMigration(
  q: QmpClient,
  want: string[],
  timeoutMs: number,
): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const info = await q.execute<Record<string, unknown>>('query-migrate')
    const st = String(info.status)
    if (want.includes(st)) return info
    if (st === 'failed' || st === 'cancelled')
      throw new Error(`QEMU migration ${st}: ${JSON.stringify(info).slice(0, 500)}`)
    if (Date.now() > deadline) throw new Error(`QEMU migration still '${st}' after ${timeoutMs} ms`)
    await sleep(10)
  }
}

/**
 * Moves the VM of `src` (its QMP socket is free: nobody else holds it) to a new QEMU on `to` (started
 * here with `dstArgs`), reachable from the source at `publicIp` (ports `nbdPort` and `migratePort`
 * forwarded to `to`). `counters()` reads the destination's interface byte counters.
 */
export async function qemuStorageMigrate(o: {
  srcQmpPath: string
  to: Host
  dstArgs: string[]
  dstQmpPath: string
  publicIp: string
  nbdPort: number
  migratePort: number
  counters: () => Promise<number>
  log: (s: string) => void
  /** Mirror mode: 'full' (copy-storage-all, the default) or 'top' (only the overlay: copy-storage-inc). */
  sync?: 'full' | 'top'
  timeoutMs?: number
}): Promise<{ result: QemuMoveResult; stopDestination: () => Promise<void> }> {
  const timeoutMs = o.timeoutMs ?? 600_000
  const child = o.to.spawn('qemu-system-x86_64', o.dstArgs)
  const stopDestination = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const gone = new Promise((r) => child.once('exit', r))
      child.kill('SIGKILL')
      await Promise.race([gone, sleep(5000)])
    }
  }
  let src: QmpClient | undefined
  let dst: QmpClient | undefined
  try {
    for (let i = 0; ; i++) {
      try {
        dst = await Qmp.connect(o.dstQmpPath, { timeoutMs: 60_000 })
        break
      } catch (err) {
        if (i > 300 || child.exitCode !== null) throw err
        await sleep(100)
      }
    }
    src = await Qmp.connect(o.srcQmpPath, { timeoutMs: 60_000 })
    // Destination (libvirt: late-block-activate on, NBD server + writable export, migrate-incoming).
    await dst.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'late-block-activate', state: true },
      ],
    })
    await dst.execute('nbd-server-start', {
      addr: { type: 'inet', data: { host: '0.0.0.0', port: String(o.nbdPort) } },
    })
    await dst.execute('block-export-add', {
      type: 'nbd',
      id: 'mig-vol0',
      'node-name': 'vol0',
      name: 'vol0',
      writable: true,
    })
    await dst.execute('migrate-incoming', { uri: `tcp:0.0.0.0:${o.migratePort}` })

    // Source.
    await src.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'x-ignore-shared', state: false },
        { capability: 'events', state: true },
        { capability: 'pause-before-switchover', state: true },
      ],
    })
    await src.execute('blockdev-add', {
      driver: 'nbd',
      'node-name': 'mig-target',
      server: { type: 'inet', host: o.publicIp, port: String(o.nbdPort) },
      export: 'vol0',
    })
    const stopEvent = src.waitEvent('STOP', { timeoutMs })
    const resumeEvent = dst.waitEvent('RESUME', { timeoutMs })
    stopEvent.catch(() => {})
    resumeEvent.catch(() => {})
    const bytes0 = await o.counters()
    const t0 = Date.now()
    const ready = src.waitEvent('BLOCK_JOB_READY', { timeoutMs })
    await src.execute('blockdev-mirror', {
      'job-id': 'mig-mirror',
      device: 'vol0',
      target: 'mig-target',
      sync: o.sync ?? 'full',
    })
    await ready
    const tReady = Date.now()
    o.log(`qemu: mirror ready after ${tReady - t0} ms`)
    await src.execute('migrate', { uri: `tcp:${o.publicIp}:${o.migratePort}` })
    await waitMigration(src, ['pre-switchover'], timeoutMs)
    // The guest is paused: finish the mirror (a ready mirror's cancel completes it without a pivot).
    const jobs = await src.execute<Array<{ device: string; offset: number; len: number }>>('query-block-jobs')
    const completed = src.waitEvent('BLOCK_JOB_COMPLETED', { timeoutMs })
    await src.execute('block-job-cancel', { device: 'mig-mirror' })
    const done = await completed
    const mirrorBytes = Number(done.data.offset ?? jobs[0]?.offset ?? Number.NaN)
    const tMirror = Date.now()
    await src.execute('migrate-continue', { state: 'pre-switchover' })
    const info = await waitMigration(src, ['completed'], timeoutMs)
    await waitMigration(dst, ['completed'], timeoutMs)
    await dst.execute('nbd-server-stop')
    await dst.execute('cont')
    const [stop, resume] = await Promise.all([stopEvent, resumeEvent])
    const t1 = Date.now()
    const bytes1 = await o.counters()
    const status = await dst.execute<{ status: string }>('query-status')
    if (status.status !== 'running') throw new Error(`the destination is ${status.status} after cont`)
    const ram = (info.ram ?? {}) as Record<string, number>
    await src.execute('quit').catch(() => {})
    return {
      result: {
        totalMs: t1 - t0,
        downtimeMs: eventMs(resume) - eventMs(stop),
        wireBytes: bytes1 - bytes0,
        migrationStreamBytes: ram.transferred ?? Number.NaN,
        mirrorBytes,
        mirrorReadyMs: tReady - t0,
        mirrorFinalMs: tMirror - eventMs(stop),
      },
      stopDestination,
    }
  } catch (err) {
    await stopDestination()
    throw err
  } finally {
    src?.close()
    dst?.close()
  }
}
