//! Ranking the ways two endpoints can talk.

use serde::{Deserialize, Serialize};

use crate::model::LinkLayer;
use crate::Topology;

/// A way to move bytes to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TierKind {
    /// Same host: shared memory (NVLink / CUDA IPC belong here later).
    SharedMemory,
    /// RDMA over native InfiniBand.
    InfiniBand,
    /// RDMA over Converged Ethernet.
    Roce,
    /// Plain TCP.
    Tcp,
}

/// One usable way to reach a peer, with its nominal bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    /// Which way.
    pub kind: TierKind,
    /// Nominal bandwidth in Gbit/s: the slower of the two ends' best link speeds for this
    /// kind; `None` when unknown (shared memory, or a link speed nobody reports).
    pub nominal_gbps: Option<f64>,
    /// The local device used: `mlx5_0:1` (RDMA device and port) or a netdev for TCP.
    pub local_device: Option<String>,
}

/// What the local side knows about a peer (exchanged out of band, e.g. in a handshake).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer runs on this host.
    pub same_host: bool,
    /// Its best active InfiniBand port rate, if it has one.
    pub infiniband_gbps: Option<f64>,
    /// Its best active RoCE port rate, if it has one.
    pub roce_gbps: Option<f64>,
    /// Its fastest physical NIC that is up, if known (TCP is assumed to work regardless).
    pub tcp_gbps: Option<f64>,
}

impl PeerInfo {
    /// A peer on this host.
    pub fn same_host() -> Self {
        Self {
            same_host: true,
            ..Self::default()
        }
    }

    /// A peer on another host whose topology is `remote`.
    pub fn remote(remote: &Topology) -> Self {
        Self {
            same_host: false,
            infiniband_gbps: remote.best_rdma_port(LinkLayer::InfiniBand).map(|(_, g)| g),
            roce_gbps: remote.best_rdma_port(LinkLayer::Ethernet).map(|(_, g)| g),
            tcp_gbps: remote.best_tcp_nic().and_then(|(_, g)| g),
        }
    }
}

impl Topology {
    /// The ways to reach `peer`, best first: shared memory for a peer on this host, then
    /// InfiniBand, RoCE and TCP where both ends have them, ordered by nominal bandwidth (an
    /// unknown bandwidth last; equal ones in the order just given). TCP is always listed.
    pub fn tiers_to(&self, peer: &PeerInfo) -> Vec<Tier> {
        if peer.same_host {
            return vec![
                Tier {
                    kind: TierKind::SharedMemory,
                    nominal_gbps: None,
                    local_device: None,
                },
                Tier {
                    kind: TierKind::Tcp,
                    nominal_gbps: None,
                    local_device: Some("lo".into()),
                },
            ];
        }
        let mut tiers = Vec::new();
        for (kind, layer, theirs) in [
            (
                TierKind::InfiniBand,
                LinkLayer::InfiniBand,
                peer.infiniband_gbps,
            ),
            (TierKind::Roce, LinkLayer::Ethernet, peer.roce_gbps),
        ] {
            if let (Some((dev, ours)), Some(theirs)) = (self.best_rdma_port(layer), theirs) {
                tiers.push(Tier {
                    kind,
                    nominal_gbps: Some(ours.min(theirs)),
                    local_device: Some(dev),
                });
            }
        }
        let (nic, ours) = self.best_tcp_nic().unzip();
        let nominal_gbps = match (ours.flatten(), peer.tcp_gbps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tiers.push(Tier {
            kind: TierKind::Tcp,
            nominal_gbps,
            local_device: nic,
        });
        // Known bandwidth before unknown, faster first; the kind breaks ties.
        tiers.sort_by(|a, b| {
            let key = |t: &Tier| t.nominal_gbps.map_or(f64::NEG_INFINITY, |g| g);
            key(b).total_cmp(&key(a)).then(a.kind.cmp(&b.kind))
        });
        tiers
    }

    /// The fastest active RDMA port with link layer `layer`: (`device:port`, Gbit/s).
    pub fn best_rdma_port(&self, layer: LinkLayer) -> Option<(String, f64)> {
        self.rdma_devices
            .iter()
            .flat_map(|d| d.ports.iter().map(move |p| (d, p)))
            .filter(|(_, p)| p.is_active() && p.link_layer == Some(layer))
            .filter_map(|(d, p)| Some((format!("{}:{}", d.name, p.number), p.rate_gbps?)))
            .fold(None, |best: Option<(String, f64)>, (n, g)| match best {
                Some((_, bg)) if bg >= g => best,
                _ => Some((n, g)),
            })
    }

    /// The fastest physical NIC that is up: (name, Gbit/s if its speed is known).
    pub fn best_tcp_nic(&self) -> Option<(String, Option<f64>)> {
        self.nics
            .iter()
            .filter(|n| !n.is_virtual() && n.is_up())
            .fold(None, |best: Option<&crate::Nic>, n| match best {
                Some(b) if b.speed_mbps >= n.speed_mbps => best,
                _ => Some(n),
            })
            .map(|n| (n.name.clone(), n.speed_mbps.map(|s| s as f64 / 1000.0)))
    }
}
