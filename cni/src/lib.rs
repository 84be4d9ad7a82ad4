//! The CNI plugin of weft as a library: the commands, the address store,
//! the netlink side and the spec's types. The `weft-cni` binary reads
//! stdin and the environment and calls these; the fuzz targets call the
//! parsers directly.

pub mod cmd;
pub mod ipam;
pub mod names;
pub mod net;
pub mod spec;
