//! The transport over real loopback sockets and real shared memory: one-sided writes and
//! reads, the handshake's refusals, hostile frames, and whole KV transfers.

mod faults;
mod link;
mod policy;
mod session;
mod shaped;
#[cfg(feature = "verbs")]
mod verbs;

use std::sync::Arc;
use std::time::Duration;

use kvwire_transport::{
    Access, Connection, Endpoint, EndpointConfig, FabricKind, Region, RegionId,
};

/// Both fabrics the tests run over.
pub(crate) const FABRICS: [FabricKind; 2] = [FabricKind::Tcp, FabricKind::Shm];

/// A config with a short timeout (tests of dead peers wait this long, no more).
pub(crate) fn config(fabric: FabricKind) -> EndpointConfig {
    EndpointConfig {
        timeout: Duration::from_secs(3),
        ..EndpointConfig::new(fabric)
    }
}

/// Two endpoints, each with one `len`-byte region, connected over loopback.
pub(crate) struct Pair {
    pub(crate) a: Connection,
    pub(crate) b: Connection,
    pub(crate) region_a: (RegionId, Arc<Region>),
    pub(crate) region_b: (RegionId, Arc<Region>),
}

pub(crate) fn pair(cfg: EndpointConfig, len: usize) -> Pair {
    let ea = Endpoint::new(cfg.clone()).unwrap();
    let eb = Endpoint::new(cfg).unwrap();
    let region_a = ea.register(len, Access::ALL).unwrap();
    let region_b = eb.register(len, Access::ALL).unwrap();
    let l = eb.listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr();
    let t = std::thread::spawn(move || ea.connect(addr).unwrap());
    let b = l.accept(Duration::from_secs(5)).unwrap();
    let a = t.join().unwrap();
    Pair {
        a,
        b,
        region_a,
        region_b,
    }
}
