import { readdir, rm } from 'node:fs/promises'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Vm } from '../../vm/driver/interfaces.ts'

/** Per-process dirs for QEMU system tests: short (unix socket paths), removed by cleanupVmDirs(). */
export function vmTestDirs(tag: string): { runDir: string; ramDir: string } {
  return {
    runDir: join(tmpdir(), `mvt-${tag}-${process.pid}`),
    ramDir: join('/dev/shm', `mvt-${tag}-${process.pid}`),
  }
}

/** Lists what is left in the dirs (should be nothing after every VM stopped), then removes them. */
export async function cleanupVmDirs(dirs: { runDir: string; ramDir: string }): Promise<string[]> {
  const left: string[] = []
  for (const d of [dirs.runDir, dirs.ramDir]) {
    const names = await readdir(d).catch(() => [] as string[])
    left.push(...names.map((n) => join(d, n)))
    await rm(d, { recursive: true, force: true })
  }
  return left
}

/** Waits until the guest's console shows `pattern` (the guest is slow under TCG: generous default). */
export async function waitConsole(vm: Vm, pattern: RegExp, ms = 180_000): Promise<string> {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    const lines = await vm.consoleTail(200)
    const hit = lines.find((l) => pattern.test(l))
    if (hit !== undefined) return hit
    if (vm.status() === 'exited' || vm.status() === 'stopped') break
    await sleep(200)
  }
  throw new Error(`console never matched ${pattern}; last lines:\n${(await vm.consoleTail(20)).join('\n')}`)
}

/** A free TCP port on 127.0.0.1 (bind to 0 and release). */
export async function freePort(): Promise<number> {
  const { createServer } = await import('node:net')
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const a = s.address()
      s.close(() => resolve(typeof a === 'object' && a !== null ? a.port : 0))
    })
  })
}

/** A line-oriented TCP client (counter stream, memcheck commands) with timeouts. */
export class LineClient {
  private buf = ''
  private lines: string[] = []
  private waiters: Array<() => void> = []
  closed = false
  /** The most recent line received (consumed or not). */
  lastLine: string | undefined
  private constructor(readonly socket: Socket) {
    socket.setEncoding('utf8')
    socket.on('data', (d: string) => {
      this.buf += d
      let nl = this.buf.indexOf('\n')
      while (nl >= 0) {
        this.lastLine = this.buf.slice(0, nl).trim()
        this.lines.push(this.lastLine)
        this.buf = this.buf.slice(nl + 1)
        nl = this.buf.indexOf('\n')
      }
      for (const w of this.waiters.splice(0)) w()
    })
    const end = () => {
      this.closed = true
      for (const w of this.waiters.splice(0)) w()
    }
    socket.on('close', end)
    socket.on('error', end)
  }

  /** Connects, retrying until `ms` (slirp accepts before the guest listens: check with a first line). */
  static async connect(port: number, ms = 60_000): Promise<LineClient> {
    const deadline = Date.now() + ms
    let last: unknown
    while (Date.now() < deadline) {
      try {
        const s = await new Promise<Socket>((resolve, reject) => {
          const c = connect({ port, host: '127.0.0.1' })
          c.once('connect', () => resolve(c))
          c.once('error', reject)
        })
        return new LineClient(s)
      } catch (err) {
        last = err
        await sleep(250)
      }
    }
    throw new Error(`cannot connect to 127.0.0.1:${port}: ${String(last)}`)
  }

  /** Next line, or throws after `ms` / when the connection closed. */
  async next(ms = 30_000): Promise<string> {
    const deadline = Date.now() + ms
    while (this.lines.length === 0) {
      if (this.closed) throw new Error('connection closed')
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`no line in ${ms} ms`)
      await Promise.race([new Promise<void>((r) => this.waiters.push(r)), sleep(left)])
    }
    return this.lines.shift()!
  }

  /** Drops lines received so far; returns the last one, if any. */
  drain(): string | undefined {
    const last = this.lines.at(-1)
    this.lines = []
    return last
  }

  async command(cmd: string, ms = 60_000): Promise<string> {
    this.drain()
    this.socket.write(`${cmd}\n`)
    return this.next(ms)
  }

  close(): void {
    this.socket.destroy()
  }
}
