//! Opening an RDMA device: port, GID and MTU chosen the way RoCE v2 needs, with errors that
//! say what is missing.

use std::net::Ipv6Addr;
use std::sync::Arc;

use sideway::ibverbs::address::Gid;
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;

use super::sys;
use crate::error::{Result, TransportError};
use crate::region::{Access, Region};

/// Which device, port and GID to use.
#[derive(Debug, Clone, Default)]
pub struct DeviceSelector {
    /// Device name (`mlx5_0`, `rxe0`); the first device when `None`.
    pub name: Option<String>,
    /// Port number (1-based); 1 when `None`.
    pub port: Option<u8>,
    /// GID index; when `None`, the port's IPv4-mapped RoCE v2 GID (index 0 is the link-local
    /// one, with which connections to other hosts fail), or index 0 on InfiniBand.
    pub gid_index: Option<u32>,
}

/// An opened device with its protection domain and the port and GID connections use.
pub struct VerbsDevice {
    pub(super) ctx: Arc<DeviceContext>,
    pub(super) pd: Arc<ProtectionDomain>,
    name: String,
    pub(super) port: u8,
    pub(super) gid_index: u32,
    pub(super) gid: Gid,
    pub(super) mtu: Mtu,
    pub(super) lid: u16,
    ethernet: bool,
}

impl std::fmt::Debug for VerbsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsDevice")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("gid", &self.gid())
            .field("mtu", &self.mtu_bytes())
            .finish()
    }
}

fn err(what: impl std::fmt::Display) -> TransportError {
    TransportError::Verbs(what.to_string())
}

/// The RDMA devices, or why there are none to ask.
fn device_list() -> Result<DeviceList> {
    DeviceList::new().map_err(|e| {
        err(format!(
            "no RDMA support here (libibverbs or the kernel's RDMA stack is missing): {}",
            chain(&e)
        ))
    })
}

/// An error with its causes (sideway's outer errors do not print the OS error inside).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Bytes of an MTU value.
pub(super) const fn mtu_bytes(m: Mtu) -> u32 {
    match m {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

/// What `ibv_query_gid_type` reports for a RoCE v2 GID: libibverbs' sysfs numbering
/// (0 = InfiniBand or RoCE v1, 1 = RoCE v2), not `ibv_gid_type`'s (where v2 is 2).
const SYSFS_GID_TYPE_ROCE_V2: u32 = 1;

impl VerbsDevice {
    /// Names of the RDMA devices present.
    ///
    /// # Errors
    /// [`TransportError::Verbs`] when libibverbs is missing or the kernel has no RDMA.
    pub fn list() -> Result<Vec<String>> {
        let list = device_list()?;
        Ok(list.iter().map(|d| d.name()).collect())
    }

    /// Opens the device, checks that the port is active, and picks the GID.
    ///
    /// # Errors
    /// [`TransportError::Verbs`] naming the cause: no RDMA support, no such device, port down,
    /// no usable GID, or a failed verbs call.
    pub fn open(sel: &DeviceSelector) -> Result<Arc<Self>> {
        let list = device_list()?;
        let dev = match &sel.name {
            Some(n) => list.iter().find(|d| &d.name() == n).ok_or_else(|| {
                let have: Vec<String> = list.iter().map(|d| d.name()).collect();
                err(format!("no RDMA device {n:?} (present: {have:?})"))
            })?,
            None => list
                .iter()
                .next()
                .ok_or_else(|| err("no RDMA device present"))?,
        };
        let name = dev.name();
        let ctx = dev
            .open()
            .map_err(|e| err(format!("opening {name}: {}", chain(&e))))?;
        let port = sel.port.unwrap_or(1);
        let pa = ctx
            .query_port(port)
            .map_err(|e| err(format!("{name} port {port}: {e}")))?;
        if pa.port_state() != PortState::Active {
            return Err(err(format!(
                "{name} port {port} is not active ({:?})",
                pa.port_state()
            )));
        }
        let ethernet = pa.link_layer() == LinkLayer::Ethernet;
        let gid_index = match sel.gid_index {
            Some(i) => i,
            None if !ethernet => 0,
            None => pick_roce_v2_gid(&ctx, port, pa.gid_tbl_len()).map_err(|seen| {
                err(format!(
                    "{name} port {port} has no IPv4-mapped RoCE v2 GID (give the netdev an IPv4 address, or choose a GID index); GIDs: {seen}"
                ))
            })?,
        };
        let gid = ctx
            .query_gid(port, gid_index)
            .map_err(|e| err(format!("{name} port {port} GID {gid_index}: {e}")))?;
        if gid.is_zero() {
            return Err(err(format!("{name} port {port} GID {gid_index} is empty")));
        }
        let pd = ctx
            .alloc_pd()
            .map_err(|e| err(format!("{name}: protection domain: {e}")))?;
        Ok(Arc::new(Self {
            ctx,
            pd,
            name,
            port,
            gid_index,
            gid,
            mtu: pa.active_mtu(),
            lid: pa.lid(),
            ethernet,
        }))
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Port number in use.
    pub const fn port(&self) -> u8 {
        self.port
    }

    /// GID index in use.
    pub const fn gid_index(&self) -> u32 {
        self.gid_index
    }

    /// The GID in use, as an IPv6 address (`::ffff:a.b.c.d` for RoCE v2 over IPv4).
    pub fn gid(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.gid)
    }

    /// The port's active MTU in bytes.
    pub const fn mtu_bytes(&self) -> u32 {
        mtu_bytes(self.mtu)
    }

    /// Whether the link layer is Ethernet (RoCE) rather than InfiniBand.
    pub const fn is_ethernet(&self) -> bool {
        self.ethernet
    }

    /// Registers `region` for local use and the remote access `access` allows.
    ///
    /// # Errors
    /// [`TransportError::Verbs`] if the device refuses the registration.
    pub fn register(self: &Arc<Self>, region: Arc<Region>, access: Access) -> Result<VerbsRegion> {
        let mut flags = AccessFlags::LocalWrite;
        if access.remote_write {
            flags |= AccessFlags::RemoteWrite;
        }
        if access.remote_read {
            flags |= AccessFlags::RemoteRead;
        }
        let mr = sys::register(&self.pd, &region, flags)?;
        Ok(VerbsRegion {
            inner: Arc::new(RegInner {
                mr,
                region,
                _dev: Arc::clone(self),
            }),
        })
    }
}

/// The index of `port`'s IPv4-mapped RoCE v2 GID, or a description of the GIDs seen.
fn pick_roce_v2_gid(ctx: &DeviceContext, port: u8, len: i32) -> std::result::Result<u32, String> {
    let mut seen = Vec::new();
    for i in 0..len.max(0) as u32 {
        let Ok(g) = ctx.query_gid(port, i) else {
            continue;
        };
        if g.is_zero() {
            continue;
        }
        let ty = ctx.query_gid_type(port, i);
        let addr = Ipv6Addr::from(g);
        if addr.to_ipv4_mapped().is_some() && ty.as_ref().ok() == Some(&SYSFS_GID_TYPE_ROCE_V2) {
            return Ok(i);
        }
        seen.push(format!("[{i}] {addr} type {ty:?}"));
    }
    Err(if seen.is_empty() {
        "none".into()
    } else {
        seen.join(", ")
    })
}

pub(super) struct RegInner {
    // Field order matters: the registration goes before the region it describes.
    pub(super) mr: Arc<MemoryRegion>,
    pub(super) region: Arc<Region>,
    _dev: Arc<VerbsDevice>,
}

/// A [`Region`] registered with a device. Cloning is cheap; the registration (and the
/// region's memory) lives until the last clone and every work request naming it are gone.
#[derive(Clone)]
pub struct VerbsRegion {
    pub(super) inner: Arc<RegInner>,
}

impl std::fmt::Debug for VerbsRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsRegion")
            .field("len", &self.len())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl VerbsRegion {
    /// The region registered.
    pub fn region(&self) -> &Arc<Region> {
        &self.inner.region
    }

    /// Bytes registered.
    pub fn len(&self) -> usize {
        self.inner.region.len()
    }

    /// Whether the region is empty (never: regions have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key a peer needs to access the region.
    pub fn rkey(&self) -> u32 {
        self.inner.mr.rkey()
    }

    /// The address a peer names the region's first byte with.
    pub fn addr(&self) -> u64 {
        self.inner.mr.get_ptr() as u64
    }

    pub(super) fn lkey(&self) -> u32 {
        self.inner.mr.lkey()
    }
}
