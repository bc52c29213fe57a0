import { MeshError } from '../../src/base/errors.ts'

/** Base of every chunk-layer failure. */
export class ChunkError extends MeshError {}

/** Bytes do not hash to the name they were stored or sent under (disk corruption or a forging peer). */
export class ChunkVerifyError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CHUNK_VERIFY' })
  }
}

/** The local store has no chunk (or manifest) under that name. */
export class ChunkNotFoundError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CHUNK_NOT_FOUND' })
  }
}

/** The store would exceed its size limit even after collecting every unreferenced chunk. */
export class StoreFullError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_STORE_FULL' })
  }
}

/** A manifest's encoding is malformed, of an unknown version, or over the decode limits. */
export class ManifestDecodeError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_MANIFEST_DECODE' })
  }
}

/** A peer sent a message this protocol version cannot accept. */
export class ChunkProtocolError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CHUNK_PROTOCOL' })
  }
}

/** A fetch could not complete: no live, honest peer holds some of the chunks it needs. */
export class ChunkFetchError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_CHUNK_FETCH' })
  }
}

/** No member answered for an image name:tag. */
export class ImageNotFoundError extends ChunkError {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { ...options, code: 'E_IMAGE_NOT_FOUND' })
  }
}
