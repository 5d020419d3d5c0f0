//! The wire protocol as plain state machines (no sockets, no clocks): frame format, the
//! handshake, and the per-connection request logic. The fabrics feed bytes in and carry
//! out what these say.

pub mod core;
pub mod frame;
pub mod handshake;

pub use self::core::{close_code, Core, Inbound};
pub use frame::{CloseCode, FrameHeader, FrameKind, HEADER_LEN};
pub use handshake::{Established, Handshake, Role};
