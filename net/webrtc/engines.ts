/**
 * Engine choice: the names, the CLI parser, and the loader. An engine's module (and with it its
 * library: werift, or libdatachannel's native binary) is loaded when a link first asks for it.
 */
import { UsageError } from '../../src/base/errors.ts'
import { type EngineFactory, LINK_ENGINES, type LinkEngine } from './engine.ts'

export { DEFAULT_LINK_ENGINE, LINK_ENGINES, type LinkEngine } from './engine.ts'

/** Parses a CLI value; throws UsageError for anything else. */
export function parseLinkEngine(value: string): LinkEngine {
  if ((LINK_ENGINES as readonly string[]).includes(value)) return value as LinkEngine
  throw new UsageError(`unknown link engine '${value}' (expected ${LINK_ENGINES.join(' or ')})`)
}

const loaders: Record<LinkEngine, () => Promise<EngineFactory>> = {
  werift: async () => (await import('./werift/engine.ts')).createWeriftConnection,
  libdatachannel: async () => (await import('./ndc/engine.ts')).createNdcConnection,
}

/** The engine's connection factory (its module is imported once, on first use). */
export function loadEngine(engine: LinkEngine): Promise<EngineFactory> {
  const load = loaders[engine]
  if (load === undefined) return Promise.reject(new UsageError(`unknown link engine '${String(engine)}'`))
  return load()
}
