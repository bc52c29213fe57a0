// Preload for benchmarked processes (`NODE_OPTIONS=--import=<this file>`, with MESH_CPU_PROFILE_DIR set):
// the first SIGUSR2 starts the V8 CPU profiler, the next one writes the profile to
// $MESH_CPU_PROFILE_DIR/<pid>-<n>.cpuprofile and stops it. Node 20 refuses `--cpu-prof` in NODE_OPTIONS,
// and a profile of a whole agent's life would bury the few seconds a benchmark looks at.
import { writeFileSync } from 'node:fs'
import { Session } from 'node:inspector'
import { join } from 'node:path'

const dir = process.env.MESH_CPU_PROFILE_DIR
if (dir !== undefined && dir !== '') {
  const session = new Session()
  session.connect()
  let running = false
  let n = 0
  process.on('SIGUSR2', () => {
    if (!running) {
      running = true
      session.post('Profiler.setSamplingInterval', { interval: 500 }, () => {
        session.post('Profiler.enable', () => session.post('Profiler.start'))
      })
      return
    }
    running = false
    session.post('Profiler.stop', (err, res) => {
      if (err === null)
        writeFileSync(join(dir, `${process.pid}-${n++}.cpuprofile`), JSON.stringify(res.profile))
    })
  })
}
