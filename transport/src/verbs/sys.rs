//! The only unsafe code of the verbs layer: registering memory and pointing work requests at
//! it. Callers guarantee, through the owning types, that the memory outlives the registration
//! and every work request that names it.
#![allow(unsafe_code)]

use std::sync::Arc;

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    PostRecvGuard, PostSendGuard, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use crate::error::{Result, TransportError};
use crate::region::Region;

/// Registers all of `region` with `pd`.
pub(super) fn register(
    pd: &Arc<ProtectionDomain>,
    region: &Region,
    access: AccessFlags,
) -> Result<Arc<MemoryRegion>> {
    // SAFETY: the pointer and length describe `region`'s whole live mapping. The returned MR
    // is only ever stored in a `VerbsRegion` next to an `Arc` of that same region, so the
    // mapping outlives the registration (the MR deregisters on drop, before the Arc goes).
    unsafe { pd.reg_mr(region.base_ptr() as usize, region.len(), access) }
        .map_err(|e| TransportError::Verbs(format!("registering {} bytes: {e}", region.len())))
}

/// What a send work request does at the remote side.
pub(super) enum RemoteOp {
    /// RDMA WRITE, with an immediate if given.
    Write(Option<u32>),
    /// RDMA READ into the local buffer.
    Read,
}

/// One send work request, its local buffer already checked against its region.
pub(super) struct SendWr {
    pub(super) wr_id: u64,
    pub(super) op: RemoteOp,
    pub(super) rkey: u32,
    pub(super) remote_addr: u64,
    pub(super) lkey: u32,
    pub(super) addr: u64,
    pub(super) len: u32,
    /// Whether it produces a completion (unsignaled ones retire with a later signaled one).
    pub(super) signaled: bool,
}

/// Adds `wr` to `guard`.
///
/// The caller has checked that `wr.addr..wr.addr + wr.len` lies inside the live region whose
/// MR has `wr.lkey`, and keeps that region alive until the request's completion.
pub(super) fn add_send<G: PostSendGuard>(guard: &mut G, wr: SendWr) {
    let SendWr {
        wr_id,
        op,
        rkey,
        remote_addr,
        lkey,
        addr,
        len,
        signaled,
    } = wr;
    let flags = if signaled {
        WorkRequestFlags::Signaled
    } else {
        WorkRequestFlags::none()
    };
    let wr = guard.construct_wr(wr_id, flags);
    let local = match op {
        RemoteOp::Write(None) => wr.setup_write(rkey, remote_addr),
        RemoteOp::Write(Some(imm)) => wr.setup_write_imm(rkey, remote_addr, imm),
        RemoteOp::Read => wr.setup_read(rkey, remote_addr),
    };
    // SAFETY: the buffer lies inside a registered, live region (the caller's checks above);
    // the hardware reads or writes it until the completion, and the owning types keep the
    // region alive that long.
    unsafe { local.setup_sge(lkey, addr, len) };
}

/// Adds a receive of at most `len` bytes into (`lkey`, `addr`) to `guard`.
///
/// The caller has checked that `addr..addr + len` lies inside the live region whose MR has
/// `lkey`, and keeps that region alive as long as the queue pair may still fill it.
pub(super) fn add_recv(guard: &mut PostRecvGuard<'_>, wr_id: u64, lkey: u32, addr: u64, len: u32) {
    let wr = guard.construct_wr(wr_id);
    // SAFETY: as stated above: a checked range of a registered region that outlives the
    // receive (the queue pair's owner holds the region for the queue pair's lifetime).
    unsafe { wr.setup_sge(lkey, addr, len) };
}
