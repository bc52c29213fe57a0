import assert from 'node:assert/strict'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Command } from 'commander'
import { type AgentCliOptions, addAgentOptions, toAgentOptions } from '../../src/commands/agent-options.ts'
import { AGENT_CONFIG_KEYS, envName } from '../../src/config-file.ts'

/** Parses `mesh agent ARGS` with this environment and returns the agent options it would run with. */
async function parse(args: string[], env: Record<string, string> = {}) {
  const saved = { ...process.env }
  for (const k of Object.keys(process.env)) if (k.startsWith('MESH_')) delete process.env[k]
  Object.assign(process.env, env)
  try {
    let got: AgentCliOptions | undefined
    const cmd = addAgentOptions(new Command('agent')).action((o: AgentCliOptions) => {
      got = o
    })
    cmd.exitOverride()
    await cmd.parseAsync(args, { from: 'user' })
    return toAgentOptions(got!)
  } finally {
    for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k]
    Object.assign(process.env, saved)
  }
}

describe('agent configuration: flags > MESH_* env > config file > defaults', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mesh-config-'))
  const file = join(dir, 'agent.json')
  after(() => rmSync(dir, { recursive: true, force: true }))

  it('layers the three sources per option', async () => {
    writeFileSync(
      file,
      JSON.stringify({
        name: 'from-file',
        listen: ['/ip4/0.0.0.0/tcp/4001'],
        metrics: true,
        direct: false,
        stunPort: 3479,
      }),
    )
    const fileOnly = await parse(['--config', file, '--state', dir])
    assert.equal(fileOnly.name, 'from-file')
    assert.deepEqual(fileOnly.listen, ['/ip4/0.0.0.0/tcp/4001'])
    assert.equal(fileOnly.metrics, '127.0.0.1:9464')
    assert.equal(fileOnly.direct, false)
    assert.equal(fileOnly.stunPort, 3479)
    assert.equal(fileOnly.web, undefined)
    const env = await parse(['--state', dir], {
      MESH_CONFIG: file,
      MESH_NAME: 'from-env',
      MESH_LISTEN: '/ip4/127.0.0.1/tcp/1,/ip4/127.0.0.1/tcp/2',
      MESH_DIRECT: '1',
      MESH_WEB: '127.0.0.1:9999',
    })
    assert.equal(env.name, 'from-env')
    assert.deepEqual(env.listen, ['/ip4/127.0.0.1/tcp/1', '/ip4/127.0.0.1/tcp/2'])
    assert.equal(env.direct, true)
    assert.equal(env.web, '127.0.0.1:9999')
    assert.equal(env.metrics, '127.0.0.1:9464') // still from the file
    const flags = await parse(
      ['--state', dir, '--name', 'from-flag', '--no-direct', '--listen', '/ip4/1.2.3.4/tcp/5'],
      {
        MESH_CONFIG: file,
        MESH_NAME: 'from-env',
        MESH_DIRECT: 'yes',
      },
    )
    assert.equal(flags.name, 'from-flag')
    assert.equal(flags.direct, false)
    assert.deepEqual(flags.listen, ['/ip4/1.2.3.4/tcp/5'])
  })

  it('refuses unknown keys, wrong types, bad env values and a missing named file', async () => {
    writeFileSync(file, JSON.stringify({ lsiten: ['x'] }))
    await assert.rejects(
      parse(['--config', file]),
      (e: Error) => e.name === 'ConfigError' && /unknown key 'lsiten'/.test(e.message),
    )
    writeFileSync(file, JSON.stringify({ bootstrap: 'yes' }))
    await assert.rejects(parse(['--config', file]), (e: Error) =>
      /'bootstrap' must be true or false/.test(e.message),
    )
    writeFileSync(file, '{')
    await assert.rejects(parse(['--config', file]), (e: Error) => /not valid JSON/.test(e.message))
    await assert.rejects(parse(['--config', join(dir, 'nope.json')]), (e: Error) =>
      /does not exist/.test(e.message),
    )
    await assert.rejects(parse([], { MESH_CONFIG: join(dir, 'nope.json') }), /does not exist/)
    writeFileSync(file, '{}')
    await assert.rejects(parse(['--config', file], { MESH_PNET: 'maybe' }), /MESH_PNET='maybe'/)
    await assert.rejects(parse(['--config', file], { MESH_ENGINE: 'quic' }), /engine 'quic'/)
  })

  it('has one env name per key, every one an option of mesh agent', () => {
    const cmd = addAgentOptions(new Command('agent'))
    const attrs = new Set(cmd.options.map((o) => o.attributeName()))
    for (const key of Object.keys(AGENT_CONFIG_KEYS))
      assert.ok(attrs.has(key), `no option for config key ${key}`)
    assert.equal(envName('stunPort'), 'MESH_STUN_PORT')
    assert.equal(envName('turnCredentials'), 'MESH_TURN_CREDENTIALS')
  })
})
