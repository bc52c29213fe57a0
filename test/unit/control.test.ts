import assert from 'node:assert/strict'
import { mkdtempSync, rmSync, statSync } from 'node:fs'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { MeshError } from '../../src/base/errors.ts'
import { AgentUnavailableError, connectControl } from '../../src/control/client.ts'
import { type ControlServer, createControlServer } from '../../src/control/server.ts'
import {
  ControlProtocolError,
  decodeClientMessage,
  decodeServerMessage,
} from '../../src/control/v1/messages.ts'

class NopeError extends MeshError {}

describe('control API (unix socket)', () => {
  let dir: string
  let server: ControlServer
  let cancelled = false

  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'mesh-ctl-'))
    cancelled = false
    server = createControlServer({
      path: join(dir, 'control.sock'),
      handlers: {
        echo: async (params) => params,
        progress: async (_p, ctx) => {
          for (let i = 0; i < 3; i++) ctx.emit({ step: i })
          return 'done'
        },
        fail: async () => {
          throw new NopeError('nope, and here is why', { code: 'E_NOPE', exitCode: 3 })
        },
        hang: (_p, ctx) =>
          new Promise((_resolve, reject) => {
            ctx.signal.addEventListener('abort', () => {
              cancelled = true
              reject(new Error('aborted'))
            })
          }),
      },
    })
    await server.start()
  })
  afterEach(async () => {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  })

  it('the socket is owner-only', () => {
    assert.equal(statSync(join(dir, 'control.sock')).mode & 0o777, 0o600)
  })

  it('calls return results and stream events', async () => {
    const c = await connectControl(join(dir, 'control.sock'))
    try {
      assert.deepEqual(await c.call('echo', { a: [1, 2] }), { a: [1, 2] })
      const events: unknown[] = []
      assert.equal(await c.call('progress', {}, { onEvent: (e) => events.push(e) }), 'done')
      assert.deepEqual(events, [{ step: 0 }, { step: 1 }, { step: 2 }])
    } finally {
      c.close()
    }
  })

  it('errors keep their code and exit status; unknown methods are named', async () => {
    const c = await connectControl(join(dir, 'control.sock'))
    try {
      await assert.rejects(
        c.call('fail'),
        (e: MeshError) => e.name === 'RemoteError' && e.code === 'E_NOPE' && e.exitCode === 3,
      )
      await assert.rejects(c.call('nosuch'), (e: MeshError) => e.code === 'E_UNKNOWN_METHOD')
    } finally {
      c.close()
    }
  })

  it('aborting a call cancels the handler on the agent', async () => {
    const c = await connectControl(join(dir, 'control.sock'))
    try {
      const ac = new AbortController()
      const p = c.call('hang', {}, { signal: ac.signal })
      setTimeout(() => ac.abort(), 50)
      await assert.rejects(p)
      assert.equal(cancelled, true)
    } finally {
      c.close()
    }
  })

  it('garbage from a client drops that client only', async () => {
    const path = join(dir, 'control.sock')
    await new Promise<void>((resolve) => {
      const s = connect(path, () => s.write('{"v":1,"id":1,"method":"echo"\n'))
      s.resume()
      s.on('close', () => resolve())
      s.on('error', () => {})
    })
    const c = await connectControl(path)
    assert.equal(await c.call('echo', 5), 5)
    c.close()
  })

  it('a missing agent gives an actionable error', async () => {
    await assert.rejects(connectControl(join(dir, 'nosock')), (e: Error) => {
      return e instanceof AgentUnavailableError && /no agent is running/.test(e.message)
    })
  })

  it('decoders only ever throw ControlProtocolError on arbitrary input', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string(), fc.json()), (s) => {
        for (const decode of [decodeClientMessage, decodeServerMessage]) {
          try {
            decode(s)
          } catch (e) {
            if (!(e instanceof ControlProtocolError)) throw e
          }
        }
      }),
      { numRuns: 2000 },
    )
  })
})
