/**
 * Membership and admission — design
 * =================================
 *
 * Keys
 * - Every node has its own Ed25519 identity (its PeerId; `net/identity`). libp2p noise proves the
 *   remote's PeerId on every connection, so "who is on the other end" is always authenticated.
 * - A network has one Ed25519 *network key*. Only its holder (the creator; the key file is mode 0600)
 *   can sign. Every member and every invite carries the network PUBLIC key; the network id is
 *   sha256(public key ‖ name), so a member that knows the id can check that a public key belongs to it.
 *
 * Who signs what
 * - Invite (network key): { network id, network name, network public key, bootstrap multiaddrs,
 *   expiresAt, 16-byte random nonce, optional bound PeerId }. Encoded `mesh1:` + base64url of the
 *   signed body bytes and the signature; the exact signed bytes travel, so there is no
 *   canonicalisation problem.
 * - Member entry (the admitting member's identity key): { peerId, name, the invite string, addedBy,
 *   addedAt }. The entry embeds the invite, so anyone can re-check, without any other state, that the
 *   network key really authorised this admission (signature, network id, binding). The addedBy
 *   signature makes the admitter accountable and stops other members from forging entries in its name.
 * - Revocation (network key): { peerId, at }. Only the network key holder may revoke, like only it may
 *   invite: revocation is how a compromised member is thrown out, so it must not be something the
 *   compromised member could do to everyone else. It also makes every revocation verifiable without
 *   knowing who the members are, which keeps the merge a pure set union (below).
 *
 * Admission (`/mesh/admit/1`, the only protocol a non-member may open)
 * The joiner dials any bootstrap address from the invite and sends { invite, name }. The member checks,
 * against ITS OWN copy of the network public key (never the key inside the invite): signature, network
 * id, expiry (its own clock), binding == the noise-authenticated remote PeerId, the peer is not revoked,
 * and the nonce has not been used by another peer. It then signs an entry, merges it into its member set,
 * replies with the whole set, and gossips it.
 *
 * Why this is safe
 * - Forged invite: needs the network secret key; a key swapped inside the invite fails because members
 *   verify with their own key and the network id binds key and name.
 * - Stolen/replayed invite: the nonce is single-use. Its first admission is recorded in the replicated
 *   set; a second peer presenting it is refused (if two members admit two peers with one nonce at the
 *   same time in a partition, the merge keeps exactly one — the smallest PeerId — deterministically).
 *   A bound invite is useless to anyone but the bound PeerId (noise proves the PeerId). Expiry bounds
 *   the window of an unbound leaked invite.
 * - Revoked node: revocations are tombstones keyed by PeerId and win over any entry, so neither the old
 *   invite nor a new one readmits that PeerId; its invite nonce stays used.
 * - Non-members cannot inject state: the member-set protocol and every other mesh protocol refuse
 *   streams from peers that are not current members, before reading a byte.
 *
 * Enforcement in the node (net/node.ts): every stream handler — the mesh protocols and libp2p's own
 * identify and ping — runs behind one member check that resets the stream before reading a byte and
 * logs/emits a `refused` event. Circuit-relay reservations and relayed connections are gated the same
 * way (connection gater). A peer we do not know yet may have just been admitted elsewhere; the check
 * then asks that peer once (per 10 s) for the records about itself, which verify on their own. A
 * stranger's connection is closed after an admission window. A revoked peer may still connect, so
 * that its first stream gets a clear "revoked" refusal; revocation also closes its links and
 * connections everywhere. Optionally, pnet (a PSK derived from the network public key) keeps
 * non-invite-holders from completing even the TCP handshake.
 *
 * Replication: the member set is a grow-only set of signed records (entries ∪ revocations), keyed by the
 * hash of their bytes. Each record is verified on its own; merge is set union, hence commutative,
 * associative and idempotent, and the current members are a deterministic function of the set. Members
 * push-pull the whole set over `/mesh/members/1` on every new connection and after every change.
 */

/** What the network key signs in an invite. */
export interface InviteBody {
  readonly v: 1
  readonly networkId: string
  readonly networkName: string
  /** base64url of the raw 32-byte Ed25519 network public key. */
  readonly networkPublicKey: string
  readonly bootstrap: readonly string[]
  /** Unix ms. */
  readonly expiresAt: number
  /** base64url, 16 random bytes. */
  readonly nonce: string
  /** When set, only this PeerId may use the invite. */
  readonly boundPeer?: string
}

export interface Invite {
  readonly body: InviteBody
  /** The encoded `mesh1:` string (what travels and what member entries embed). */
  readonly encoded: string
}

/** The public description of a network that every member keeps. */
export interface NetworkInfo {
  readonly id: string
  readonly name: string
  /** raw 32-byte Ed25519 public key */
  readonly publicKey: Uint8Array
}

export interface MemberEntryBody {
  readonly kind: 'add'
  readonly peerId: string
  readonly name: string
  readonly invite: string
  readonly addedBy: string
  readonly addedAt: number
}

export interface RevocationBody {
  readonly kind: 'revoke'
  readonly networkId: string
  readonly peerId: string
  readonly at: number
}

export type RecordBody = MemberEntryBody | RevocationBody

/** A signed record as it is stored and replicated. */
export interface SignedRecord {
  /** base64url of the exact signed bytes (UTF-8 JSON of a RecordBody). */
  readonly body: string
  /** base64url Ed25519 signature over those bytes. */
  readonly sig: string
}

export interface VerifiedRecord {
  readonly id: string
  readonly record: SignedRecord
  readonly body: RecordBody
  /** For entries: the decoded invite they embed. */
  readonly invite?: InviteBody
}

export interface Member {
  readonly peerId: string
  readonly name: string
  readonly addedBy: string
  readonly addedAt: number
  readonly inviteNonce: string
}
