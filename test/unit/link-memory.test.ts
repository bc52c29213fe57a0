import { createMemoryLinkPair } from '../../net/link/memory.ts'
import { runLinkCompliance } from '../helpers/link-compliance.ts'

runLinkCompliance('memory', async () => {
  const { a, b } = createMemoryLinkPair('peer-a', 'peer-b')
  return {
    a,
    b,
    async cleanup() {
      a.close()
      b.close()
    },
  }
})
