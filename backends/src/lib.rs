//! Data plane backends (vxlan, host-gw, ipsec): desired state from leases,
//! diff, and the netlink `Dataplane`. Filled by the node-daemon issue.
