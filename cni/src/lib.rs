//! The CNI plugin `weft-cni`. Filled by the CNI issue.
