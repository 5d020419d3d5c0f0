//! kvwire-transport: pinned regions, fabrics (TCP, shared memory) with one-sided write and
//! read semantics, and the per-layer pipeline that ships KV caches through them.
//!
//! The shape follows Mooncake's Transfer Engine and NIXL: register memory once
//! ([`Endpoint::register`]), exchange metadata when connecting ([`Endpoint::connect`],
//! [`Listener::accept`]), then post writes and reads against the peer's regions and poll
//! for completions and notifications ([`Link`]). [`session`] puts the codec behind it:
//! [`session::send_kv`] encodes each (layer, chunk) block into a send slot and writes it into
//! a receive slot of the peer, which decodes it while later blocks are on the wire.
//!
//! The protocol logic ([`proto`]) is plain state machines, tested without sockets.

mod endpoint;
mod error;
mod link;
pub mod meta;
pub mod policy;
pub mod proto;
mod raw;
mod region;
pub mod session;
mod shm;
mod tcp;
#[cfg(feature = "verbs")]
pub mod verbs;

pub use endpoint::{Connection, Endpoint, EndpointConfig, Listener};
pub use error::{Result, TransportError};
pub use link::{Event, Link, Notification, SendBuf};
pub use meta::{EndpointMeta, FabricKind};
pub use region::{Access, Backing, Region, RegionId, RegionOptions, RegionSlice, RegionTable};

/// Version of the wire protocol (frames and handshake).
pub const PROTOCOL_VERSION: u16 = 1;
