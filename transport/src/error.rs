//! The crate's error type.

use std::io;
use std::time::Duration;

/// Result with [`TransportError`].
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Everything that can go wrong moving bytes between endpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A wait ran past its deadline.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The peer closed the connection or died.
    #[error("peer closed the connection: {0}")]
    PeerClosed(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this side speaks kvwire wire version {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Ours.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// Token authentication failed.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer sent bytes that break the protocol (bad frame, out-of-bounds access, ...).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A local access fell outside a registered region.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// A caller-side misuse (bad argument, wrong state).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The two endpoints cannot talk over the requested fabric.
    #[error("fabric mismatch: {0}")]
    FabricMismatch(String),
    /// The RDMA stack refused: no libibverbs or device, port down, no usable GID, a verbs
    /// call failed, or a work request completed with an error status.
    #[error("verbs: {0}")]
    Verbs(String),
    /// The codec refused a block (encode or decode).
    #[error("codec: {0}")]
    Codec(#[from] kvwire_codec::CodecError),
    /// A received block failed to decode (corrupt, CRC mismatch, ...).
    #[error("block (layer {layer}, chunk {chunk}) failed to decode: {source}")]
    Block {
        /// Layer of the block.
        layer: u32,
        /// Chunk of the block.
        chunk: u32,
        /// Why.
        #[source]
        source: kvwire_codec::CodecError,
    },
    /// The remote side aborted the transfer and said why.
    #[error("peer aborted the transfer: {0}")]
    RemoteAbort(String),
}

impl TransportError {
    /// Wraps an I/O error, turning timeouts and connection resets into the matching variants.
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::PeerClosed(format!("{what}: {source}")),
            _ => Self::Io { what, source },
        }
    }
}
