// Spec output, plus one closing line "tests: N passed, N failed, N skipped" that any CI can read.
// Skipped tests are listed with the reason their suite printed (see fixtures/testnet/prereq.ts).
'use strict'
const Mocha = require('mocha')

class MeshReporter extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options)
    const skipped = []
    runner.on('pending', (test) => skipped.push(test.fullTitle()))
    runner.once('end', () => {
      const s = runner.stats ?? { passes: 0, failures: 0, pending: 0 }
      if (skipped.length > 0) {
        process.stdout.write(`\nskipped (${skipped.length}):\n`)
        for (const t of skipped) process.stdout.write(`  - ${t}\n`)
      }
      process.stdout.write(`\ntests: ${s.passes} passed, ${s.failures} failed, ${s.pending} skipped\n`)
    })
  }
}

module.exports = MeshReporter
