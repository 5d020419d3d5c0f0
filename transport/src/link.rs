//! A connection to one peer, whatever the fabric: post one-sided writes and reads, send
//! small two-sided messages, and poll for what happened.

use std::time::Duration;

use crate::error::Result;
use crate::meta::{EndpointMeta, FabricKind};
use crate::policy::rate::LinkEstimate;
use crate::region::{RegionId, RegionSlice};

/// Bytes to write: an owned buffer (returned with the completion, for reuse) or a slice of
/// a registered region (sent from the region without a copy).
#[derive(Debug)]
pub enum SendBuf {
    /// An owned buffer, written whole.
    Bytes(Vec<u8>),
    /// A range of a registered region.
    Region(RegionSlice),
}

impl SendBuf {
    /// Bytes to be written.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(v) => v.len() as u64,
            Self::Region(s) => s.len,
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A peer's write landed in one of our regions (delivered after its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The region written.
    pub region: RegionId,
    /// Where in it.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
    /// The writer's immediate value.
    pub imm: Option<u32>,
}

/// Something that happened on a connection.
#[derive(Debug)]
pub enum Event {
    /// Our write `wr_id` is in the peer's region; its buffer comes back.
    WriteDone {
        /// The caller's id.
        wr_id: u64,
        /// The buffer the write was sent from.
        buf: SendBuf,
    },
    /// Our read `wr_id` filled `dst`.
    ReadDone {
        /// The caller's id.
        wr_id: u64,
        /// The destination given to the read.
        dst: RegionSlice,
    },
    /// The peer wrote into one of our regions.
    Notify(Notification),
    /// A two-sided message from the peer.
    Message(Vec<u8>),
}

/// One connection to one peer, over some fabric.
///
/// Events come out in the order they happened on each data stream; a notification always
/// comes after the data it describes. Once the connection fails, [`Link::poll`] returns the
/// error (after the events that preceded it) and every later call fails too.
pub trait Link: Send + Sync {
    /// The fabric.
    fn fabric(&self) -> FabricKind;

    /// The peer's metadata (its regions, addresses, capabilities).
    fn peer(&self) -> &EndpointMeta;

    /// Posts a one-sided write of `buf` into the peer's region `dst` at `offset`, with an
    /// optional immediate the peer receives in its notification. Completion comes as
    /// [`Event::WriteDone`] with `wr_id`.
    ///
    /// # Errors
    /// Out of the peer's advertised region (nothing sent), too many writes in flight, or a
    /// failed connection.
    fn post_write(
        &self,
        buf: SendBuf,
        dst: RegionId,
        offset: u64,
        imm: Option<u32>,
        wr_id: u64,
    ) -> Result<()>;

    /// Posts a one-sided read of `dst.len` bytes at the peer's region `src`, `offset`, into
    /// `dst`. Completion comes as [`Event::ReadDone`].
    ///
    /// # Errors
    /// As [`Link::post_write`].
    fn post_read(&self, src: RegionId, offset: u64, dst: RegionSlice, wr_id: u64) -> Result<()>;

    /// Sends a small two-sided message (at most [`crate::proto::frame::MAX_MSG_LEN`] bytes).
    ///
    /// # Errors
    /// Too long, or a failed connection.
    fn send_msg(&self, msg: &[u8]) -> Result<()>;

    /// The next event, waiting at most `timeout`; `Ok(None)` if none came in time.
    ///
    /// # Errors
    /// The connection failed or the peer closed it.
    fn poll(&self, timeout: Duration) -> Result<Option<Event>>;

    /// Ends the connection, telling the peer why (`reason` is empty for an orderly close).
    fn close(&self, reason: &str);

    /// CPU time this side has spent moving written bytes so far, and those bytes: what a
    /// write costs the cores that also run the codec (the kernel's TCP stack, a copy). `None`
    /// where the fabric does not measure it (RDMA moves bytes without the CPU).
    fn send_cpu(&self) -> Option<(u64, Duration)> {
        None
    }

    /// What the last transfer on this connection measured of the link, which the next one
    /// starts from rather than probing (see [`LinkEstimate`]); `None` where nothing is kept.
    fn link_estimate(&self) -> Option<LinkEstimate> {
        None
    }

    /// Keeps what a transfer measured of the link for the next transfer on this connection.
    fn set_link_estimate(&self, estimate: LinkEstimate) {
        let _ = estimate;
    }
}

impl std::fmt::Debug for dyn Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("fabric", &self.fabric())
            .field("peer_addrs", &self.peer().addrs)
            .finish()
    }
}
