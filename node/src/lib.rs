//! The node daemon `weft-node`: lease keeper, peer watch, reconcile loop.
//! Filled by the node-daemon issue.
