/**
 * Contracts of the chunk layer: content-addressed chunks on disk, manifests that list them, and the
 * service that fetches them from members over the overlay's 'chunks' channel.
 */

/** A chunk's name: 32-byte SHA-256 of its bytes (ZERO_HASH stands for an all-zero chunk). */
export type ChunkHash = Uint8Array

/** A resource (file or byte range) cut into fixed-size chunks. The last chunk may be shorter. */
export interface Manifest {
  readonly size: number
  readonly chunkSize: number
  readonly count: number
  /** count × 32 bytes, chunk i's name at [32i, 32i+32). */
  readonly hashes: Uint8Array
}

/** Keeps chunks from garbage collection while an operation still references them in memory only. */
export interface StoreLease {
  add(hash: ChunkHash): void
  release(): void
}

export interface ReadItem {
  hash: ChunkHash
  target: Uint8Array
}

export interface StoreStats {
  chunks: number
  bytes: number
  maxBytes: number
  manifests: number
}

export interface GcResult {
  removedChunks: number
  removedBytes: number
  removedManifests: number
}

export interface ChunkStore {
  readonly dir: string
  /** Default chunk size for manifests built against this store. */
  readonly chunkSize: number
  /** Present in the local index (a cheap in-memory lookup). */
  has(hash: ChunkHash): boolean
  /** Byte length of a stored chunk; undefined when absent. */
  sizeOf(hash: ChunkHash): number | undefined
  /**
   * Reads stored chunks straight into the caller's buffers (each `target` exactly sizeOf(hash) bytes),
   * verifying every one. Chunks that lie back to back in the store are read with one system call, so
   * serving a run of chunks costs one read, not one per chunk. Per item: undefined when read and
   * verified, else the error (ChunkVerifyError: the bad copy was dropped; ChunkNotFoundError).
   */
  readInto(items: readonly ReadItem[]): Promise<(Error | undefined)[]>
  /** Reads and verifies a chunk: ChunkVerifyError if its bytes do not match (the bad copy is removed),
   *  ChunkNotFoundError if absent. */
  get(hash: ChunkHash): Promise<Buffer>
  /** Hashes and stores bytes; with `expected`, ChunkVerifyError on mismatch. All-zero data is not
   *  stored (ZERO_HASH is returned). */
  put(data: Uint8Array, expected?: ChunkHash): Promise<ChunkHash>
  /** Stores bytes whose hash the caller computed itself (the manifest builder, a verified block). */
  putVerified(hash: ChunkHash, data: Uint8Array): Promise<void>
  delete(hash: ChunkHash): Promise<void>
  lease(): StoreLease
  putManifest(manifest: Manifest): Promise<string>
  getManifest(id: string): Promise<Manifest>
  hasManifest(id: string): boolean
  /** Retains a manifest (and so its chunks) under a name, e.g. 'image/debian:12/kernel'. */
  pin(name: string, manifestId: string): Promise<void>
  unpin(name: string): Promise<void>
  pins(): ReadonlyMap<string, string>
  /** Deletes every chunk and manifest that no pin (or live lease) references. */
  gc(): Promise<GcResult>
  stats(): StoreStats
  /** Waits for queued writes and closes open files. */
  close(): Promise<void>
}
