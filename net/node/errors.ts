import { MeshError } from '../../src/base/errors.ts'
import { MembershipError } from '../membership/errors.ts'

/** start() was called on a node that has neither joined a network nor holds a network key. */
export class NotJoinedError extends MembershipError {
  constructor(stateDir: string) {
    super(`${stateDir} has not joined a network: run 'mesh join INVITE' (or start with the network key)`, {
      code: 'E_NOT_JOINED',
    })
  }
}

/** The operation needs a running node (or, for join(), a stopped one). */
export class NodeStateError extends MeshError {
  constructor(message: string) {
    super(message, { code: 'E_NODE_STATE' })
  }
}
