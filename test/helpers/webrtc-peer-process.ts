/**
 * Drives test/helpers/webrtc-peer.ts children: writes their config file (mode 0600, it may hold TURN
 * credentials), sends JSON commands on stdin and waits for JSON events on stdout.
 */
import type { ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { PeerConfig } from './webrtc-peer.ts'

export const PEER_SCRIPT = fileURLToPath(new URL('./webrtc-peer.ts', import.meta.url))
export const RELAY_SCRIPT = fileURLToPath(new URL('./webrtc-signal-relay.ts', import.meta.url))

export interface PeerEvent {
  ev: string
  [k: string]: unknown
}

export class PeerProcess {
  private readonly events: PeerEvent[] = []
  private cursor = 0
  private waiters = new Set<() => void>()
  readonly output: string[] = []
  ended = false

  constructor(readonly child: ChildProcess) {
    let partial = ''
    const onData = (b: Buffer) => {
      const parts = (partial + b.toString('utf8')).split('\n')
      partial = parts.pop() ?? ''
      for (const line of parts) {
        this.output.push(line)
        if (this.output.length > 500) this.output.shift()
        if (line.startsWith('{"ev"')) {
          try {
            this.events.push(JSON.parse(line) as PeerEvent)
          } catch {
            // not one of ours
          }
        }
      }
      for (const w of [...this.waiters]) w()
    }
    child.stdout?.on('data', onData)
    child.stderr?.on('data', (b: Buffer) => {
      this.output.push(...b.toString('utf8').split('\n').filter(Boolean))
    })
    child.once('exit', () => {
      this.ended = true
      for (const w of [...this.waiters]) w()
    })
  }

  send(cmd: Record<string, unknown>): void {
    this.child.stdin?.write(`${JSON.stringify(cmd)}\n`)
  }

  /** Waits for the next event named `ev` (events before the last consumed one are skipped). An
   *  'error' event fails the wait. */
  next(ev: string, timeoutMs: number): Promise<PeerEvent> {
    return new Promise((resolve, reject) => {
      const check = () => {
        for (; this.cursor < this.events.length; this.cursor++) {
          const e = this.events[this.cursor]!
          if (e.ev === ev || e.ev === 'error') {
            this.cursor++
            done()
            if (e.ev === 'error' && ev !== 'error') reject(new Error(`peer error: ${JSON.stringify(e)}`))
            else resolve(e)
            return
          }
        }
        if (this.ended) {
          done()
          reject(new Error(`peer exited before '${ev}': ${this.output.slice(-8).join(' | ')}`))
        }
      }
      const timer = setTimeout(() => {
        done()
        reject(new Error(`no '${ev}' event within ${timeoutMs} ms: ${this.output.slice(-8).join(' | ')}`))
      }, timeoutMs)
      const done = () => {
        clearTimeout(timer)
        this.waiters.delete(check)
      }
      this.waiters.add(check)
      check()
    })
  }
}

/** A private temp dir for peer configs; `remove()` deletes it. */
export function peerConfigDir(): { write(name: string, cfg: PeerConfig): string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'mesh-webrtc-'))
  return {
    write(name, cfg) {
      const path = join(dir, `${name}.json`)
      writeFileSync(path, JSON.stringify(cfg), { mode: 0o600 })
      return path
    },
    remove() {
      rmSync(dir, { recursive: true, force: true })
    },
  }
}
