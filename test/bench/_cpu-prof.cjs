// Preloaded into the agents (`mesh join` / `mesh agent`) by `npm run bench -- tunnel --cpu-prof DIR`
// (through NODE_OPTIONS=--require, since Node refuses --cpu-prof there): profiles the whole process
// with the inspector; writes DIR/agent-<pid>.cpuprofile when it exits gracefully (SIGTERM/SIGINT).
const { Session } = require('node:inspector')
const { writeFileSync } = require('node:fs')
const { join } = require('node:path')

const dir = process.env.MESH_CPU_PROF_DIR
if (dir !== undefined && (process.argv.includes('agent') || process.argv.includes('join'))) {
  const session = new Session()
  session.connect()
  session.post('Profiler.enable')
  session.post('Profiler.setSamplingInterval', { interval: 500 })
  session.post('Profiler.start')
  process.once('exit', () => {
    // The in-thread session answers synchronously, so this completes inside the exit handler.
    session.post('Profiler.stop', (err, res) => {
      if (err === null && res !== undefined)
        writeFileSync(join(dir, `agent-${process.pid}.cpuprofile`), JSON.stringify(res.profile))
    })
  })
}
