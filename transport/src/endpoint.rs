//! Endpoints: registered regions plus a fabric, from which connections are made.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, TransportError};
use crate::link::Link;
use crate::meta::{Capabilities, EndpointMeta, FabricKind, RegionDesc};
use crate::region::{Access, Backing, Region, RegionId, RegionOptions, RegionTable};

/// A connection to one peer.
pub type Connection = Arc<dyn Link>;

/// How an endpoint behaves.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The fabric (both peers must agree).
    pub fabric: FabricKind,
    /// Pre-shared token; when set, peers must present the same one.
    pub token: Option<Vec<u8>>,
    /// Longest any single wait may take (connect, handshake, a stalled peer).
    pub timeout: Duration,
    /// Data streams per TCP connection (more fill faster links); shm uses one.
    pub streams: u16,
    /// Most requests of each kind in flight per connection.
    pub max_in_flight: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            fabric: FabricKind::Tcp,
            token: None,
            // Long enough for a loaded CI machine, short enough that a dead peer is noticed
            // well within a human's patience.
            timeout: Duration::from_secs(5),
            streams: 2,
            max_in_flight: 256,
        }
    }
}

impl EndpointConfig {
    /// A config for `fabric` with the other fields at their defaults.
    pub fn new(fabric: FabricKind) -> Self {
        Self {
            fabric,
            ..Self::default()
        }
    }
}

/// Registered regions and a fabric: makes connections.
#[derive(Debug, Clone)]
pub struct Endpoint {
    cfg: Arc<EndpointConfig>,
    regions: RegionTable,
    #[cfg(feature = "verbs")]
    device: Option<Arc<crate::verbs::VerbsDevice>>,
}

impl Endpoint {
    /// An endpoint with no regions yet; for the verbs fabric, on the first RDMA device with
    /// its port 1 and the GID chosen automatically (`Endpoint::with_device`, with the `verbs`
    /// feature, picks another).
    ///
    /// # Errors
    /// [`TransportError::Invalid`] for a bad stream count, or verbs asked of a build without
    /// the `verbs` feature; [`TransportError::Verbs`] if no RDMA device can be opened.
    pub fn new(cfg: EndpointConfig) -> Result<Self> {
        #[cfg(feature = "verbs")]
        if cfg.fabric == FabricKind::Verbs {
            return Self::with_device(cfg, &crate::verbs::DeviceSelector::default());
        }
        Self::build(cfg)
    }

    /// A verbs endpoint on the device, port and GID `sel` names.
    ///
    /// # Errors
    /// As [`Self::new`]; [`TransportError::Invalid`] if `cfg.fabric` is not verbs.
    #[cfg(feature = "verbs")]
    pub fn with_device(cfg: EndpointConfig, sel: &crate::verbs::DeviceSelector) -> Result<Self> {
        if cfg.fabric != FabricKind::Verbs {
            return Err(TransportError::Invalid(format!(
                "a device was given for the {} fabric",
                cfg.fabric.name()
            )));
        }
        let dev = crate::verbs::VerbsDevice::open(sel)?;
        let mut ep = Self::build(cfg)?;
        ep.device = Some(dev);
        Ok(ep)
    }

    fn build(cfg: EndpointConfig) -> Result<Self> {
        #[cfg(not(feature = "verbs"))]
        if cfg.fabric == FabricKind::Verbs {
            return Err(TransportError::Invalid(
                "this build has no verbs fabric (the `verbs` feature of kvwire-transport)".into(),
            ));
        }
        if cfg.streams == 0 || cfg.streams > crate::proto::handshake::MAX_STREAMS {
            return Err(TransportError::Invalid(format!(
                "{} streams (1 to 64)",
                cfg.streams
            )));
        }
        Ok(Self {
            cfg: Arc::new(cfg),
            regions: RegionTable::default(),
            #[cfg(feature = "verbs")]
            device: None,
        })
    }

    /// The RDMA device of a verbs endpoint (`None` for the other fabrics).
    #[cfg(feature = "verbs")]
    pub fn device(&self) -> Option<&Arc<crate::verbs::VerbsDevice>> {
        self.device.as_ref()
    }

    /// The RDMA device of a verbs endpoint.
    #[cfg(feature = "verbs")]
    pub(crate) fn verbs_device(&self) -> Result<&Arc<crate::verbs::VerbsDevice>> {
        self.device.as_ref().ok_or_else(|| {
            TransportError::Invalid(
                "this endpoint has no RDMA device (not the verbs fabric)".into(),
            )
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EndpointConfig {
        &self.cfg
    }

    /// Maps, pins and registers a region of `len` bytes (memfd-backed for shm). Peers that
    /// connect afterwards see it in the metadata.
    ///
    /// # Errors
    /// As [`Region::new`].
    pub fn register(&self, len: usize, access: Access) -> Result<(RegionId, Arc<Region>)> {
        let backing = match self.cfg.fabric {
            FabricKind::Shm => Backing::Shared,
            _ => Backing::Anonymous,
        };
        let region = Arc::new(Region::new(
            len,
            RegionOptions {
                backing,
                ..RegionOptions::default()
            },
        )?);
        let id = self.regions.register(region.clone(), access);
        Ok((id, region))
    }

    /// Registers an existing region.
    ///
    /// # Errors
    /// [`TransportError::Invalid`] if the shm fabric is given a region peers cannot map.
    pub fn register_region(&self, region: Arc<Region>, access: Access) -> Result<RegionId> {
        if self.cfg.fabric == FabricKind::Shm && region.file().is_none() {
            return Err(TransportError::Invalid(
                "the shm fabric needs memfd-backed regions (Backing::Shared)".into(),
            ));
        }
        Ok(self.regions.register(region, access))
    }

    /// Stops serving region `id` to peers.
    pub fn deregister(&self, id: RegionId) -> Option<Arc<Region>> {
        self.regions.deregister(id)
    }

    /// The regions.
    pub fn regions(&self) -> &RegionTable {
        &self.regions
    }

    /// This endpoint's metadata, as peers receive it.
    ///
    /// # Errors
    /// [`TransportError::Invalid`] if it exceeds the metadata limits.
    pub fn meta(&self) -> Result<EndpointMeta> {
        let pid = std::process::id();
        let regions = self
            .regions
            .entries()
            .into_iter()
            .map(|(id, r, access)| RegionDesc {
                id,
                len: r.len() as u64,
                key: 0,
                access,
                handle: r
                    .file()
                    .map(|f| {
                        use std::os::fd::AsRawFd;
                        format!("/proc/{pid}/fd/{}", f.as_raw_fd())
                    })
                    .unwrap_or_default(),
            })
            .collect();
        let mut caps = Capabilities::WRITE_IMM | Capabilities::READ;
        if self.cfg.fabric == FabricKind::Tcp && self.cfg.streams > 1 {
            caps |= Capabilities::MULTI_STREAM;
        }
        let m = EndpointMeta {
            protocol_version: crate::PROTOCOL_VERSION,
            fabric: self.cfg.fabric,
            capabilities: Capabilities(caps),
            addrs: vec![format!("pid:{pid}")],
            regions,
        };
        m.to_bytes()?;
        Ok(m)
    }

    /// Listens for peers on `addr` (TCP; the control connection of every fabric).
    ///
    /// # Errors
    /// [`TransportError::Io`] if the address cannot be bound.
    pub fn listen(&self, addr: impl ToSocketAddrs) -> Result<Listener> {
        crate::tcp::listen(self.clone(), addr)
    }

    /// Connects to a listening peer at `addr`.
    ///
    /// # Errors
    /// Connection refused or timed out, the handshake failed (version, token, fabric), or
    /// the peer's regions could not be mapped (shm).
    pub fn connect(&self, addr: impl ToSocketAddrs) -> Result<Connection> {
        crate::tcp::connect(self, addr)
    }
}

/// A listening endpoint; [`Listener::accept`] hands out connections whose handshake
/// completed (a background thread runs handshakes so a slow or hostile client cannot block
/// others).
pub struct Listener {
    pub(crate) addr: SocketAddr,
    pub(crate) rx: std::sync::mpsc::Receiver<Result<Connection>>,
    pub(crate) stop: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Listener {
    /// The bound address (useful after binding port 0).
    pub const fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next connection, or the error of the next failed handshake, waiting at most
    /// `timeout`.
    ///
    /// # Errors
    /// [`TransportError::Timeout`] if nobody connected in time; the handshake's error
    /// (version, token, fabric mismatch) otherwise.
    pub fn accept(&self, timeout: Duration) -> Result<Connection> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout(timeout, "a peer to connect")),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}
