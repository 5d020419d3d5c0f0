//! The verbs layer (InfiniBand, RoCE v2): devices, registered regions and RC queue pairs,
//! as safe owning wrappers over `sideway` (which dlopens libibverbs at run time, so a binary
//! built with this feature still starts where there is no RDMA, and says so).
//!
//! Ownership ties things together the way the hardware needs: a [`VerbsRegion`] holds the
//! [`Region`](crate::Region) it registered (the memory stays mapped while the device may DMA
//! into it) and the device; an [`RcQueuePair`] holds the device and its completion queue.
//! Every `unsafe` call lives in [`sys`].
//!
//! As a fabric (`FabricKind::Verbs`, `Endpoint::with_device`), a connection's payloads move
//! through [`path`]'s `VerbsPath` while its TCP control connection carries the rest.
//!
//! Connection setup is perftest's: each side creates a QP, the two exchange [`QpInfo`]
//! (QP number, PSN, GID, LID, MTU) over an out-of-band channel, then each moves its QP to
//! ready-to-send with [`RcQueuePair::connect`].

mod device;
mod path;
mod qp;
mod sys;

pub(crate) use path::VerbsPath;

pub use device::{DeviceSelector, VerbsDevice, VerbsRegion};
pub use qp::{Completion, CompletionKind, QpInfo, RcQueuePair, RemoteRegion, MAX_INLINE};
