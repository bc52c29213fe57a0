import { join } from 'node:path'
import { ChunkError } from '../../../net/chunks/errors.ts'
import { type ChunkService, createChunkService } from '../../../net/chunks/exchange.ts'
import {
  type ImageHandlerContext,
  type ImageRegistry,
  imageControlHandlers,
  openImageRegistry,
} from '../../../net/chunks/images.ts'
import type { ChunkStore } from '../../../net/chunks/interfaces.ts'
import { type ChunkStoreOptions, openChunkStore } from '../../../net/chunks/store.ts'
import type { Overlay } from '../../../net/link/interfaces.ts'
import type { Logger } from '../../base/log.ts'
import type { ControlMethod } from '../../control/api.ts'

/**
 * The chunk layer as one agent service (same shape as src/agent's AgentService, without importing it):
 * the store under STATE/chunks, the image registry, the exchange service on the overlay, and the
 * control methods image.push / image.pull / image.ls / image.rm. The overlay is passed as a getter
 * because the agent's net service creates it when it starts (before this one).
 *
 *   const chunks = createChunkAgentService({ stateDir, overlay: () => net.node.overlay, log: log.child('chunks'),
 *                                            authorize: (peer) => isMember(peer) })
 *   services.push(chunks)   // after net; migration then uses chunks.store / chunks.service
 */
export interface ChunkAgentServiceInit {
  stateDir: string
  overlay: () => Overlay
  log?: Logger
  authorize?: (peer: string) => boolean
  /** Store size limit in bytes (default unlimited). */
  maxBytes?: number
  chunkSize?: number
  /** Opens the store (default openChunkStore). A composition point: e.g. a test agent that serves
   *  forged chunks wraps the real store here, with no test hook in the service itself. */
  openStore?: (opts: ChunkStoreOptions) => Promise<ChunkStore>
}

export interface ChunkAgentService {
  readonly name: 'chunks'
  start(signal: AbortSignal): Promise<void>
  stop(): Promise<void>
  handlers(): Record<string, (params: unknown, ctx: ImageHandlerContext) => Promise<unknown>>
  status(): Record<string, unknown>
  /** Available after start(). */
  readonly store: ChunkStore
  readonly service: ChunkService
  readonly images: ImageRegistry
}

export function createChunkAgentService(init: ChunkAgentServiceInit): ChunkAgentService {
  let parts: { store: ChunkStore; service: ChunkService; images: ImageRegistry } | undefined
  const need = () => {
    if (parts === undefined) throw new ChunkError('the chunk service is not started')
    return parts
  }
  const methods = ['image.push', 'image.pull', 'image.ls', 'image.rm'] satisfies ControlMethod[]
  return {
    name: 'chunks',
    async start() {
      const store = await (init.openStore ?? openChunkStore)({
        dir: join(init.stateDir, 'chunks'),
        ...(init.maxBytes === undefined ? {} : { maxBytes: init.maxBytes }),
        ...(init.chunkSize === undefined ? {} : { chunkSize: init.chunkSize }),
      })
      const images = await openImageRegistry({ store })
      const service = createChunkService({
        overlay: init.overlay(),
        store,
        images,
        ...(init.log === undefined ? {} : { log: init.log }),
        ...(init.authorize === undefined ? {} : { authorize: init.authorize }),
      })
      service.start()
      parts = { store, service, images }
    },
    async stop() {
      const p = parts
      parts = undefined
      p?.service.stop()
      await p?.store.close()
    },
    handlers() {
      // Registered before start(): each call resolves the live handlers.
      return Object.fromEntries(
        methods.map((m) => [
          m,
          async (params: unknown, ctx: ImageHandlerContext) => {
            const p = need()
            return imageControlHandlers({ registry: p.images, service: p.service })[m]!(params, ctx)
          },
        ]),
      )
    },
    status() {
      if (parts === undefined) return { chunks: 'stopped' }
      return {
        chunks: {
          store: parts.store.stats(),
          wire: parts.service.stats(),
          images: parts.images.list().length,
        },
      }
    },
    get store() {
      return need().store
    },
    get service() {
      return need().service
    },
    get images() {
      return need().images
    },
  }
}
