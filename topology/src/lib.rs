//! kvwire-topology: what the machine looks like to a KV-cache transport.
//!
//! [`Topology`] holds NUMA nodes with their CPUs, network interfaces (speed, PCI address),
//! RDMA devices (ports, rates, GIDs and their types, the netdev under each) and GPUs, read from
//! sysfs/procfs under a root directory ([`Topology::discover`] for `/`, [`Topology::from_root`]
//! for a recorded tree). On top of it: the PCIe distance between two devices
//! ([`pcie_distance`]), the NIC nearest some memory ([`Topology::nearest_nic`]) and the ranked
//! ways to reach a peer ([`Topology::tiers_to`]). It is a pure model: no networking.

#[cfg(feature = "hwloc")]
mod hwloc;
mod model;
mod parse;
mod sysfs;
mod tiers;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use model::{Gid, GidType, Gpu, LinkLayer, Nic, NumaNode, PciLocation, RdmaDevice, RdmaPort};
pub use tiers::{PeerInfo, Tier, TierKind};

/// Why discovery failed. Individual unreadable or garbage files do not fail discovery: they
/// leave a field empty and add a line to [`Topology::warnings`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The root directory cannot be resolved.
    #[error("cannot resolve topology root {}", root.display())]
    Root {
        /// The root given.
        root: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The root has no `sys/` directory, so it is not a sysfs tree.
    #[error("topology root {} has no sys/ directory (is sysfs mounted?)", root.display())]
    NoSysfs {
        /// The root given.
        root: PathBuf,
    },
    /// hwloc failed (feature `hwloc`).
    #[cfg(feature = "hwloc")]
    #[error("hwloc: {0}")]
    Hwloc(String),
}

/// The discovered machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// NUMA nodes by id (one node 0 with every CPU on a kernel without NUMA).
    pub numa_nodes: Vec<NumaNode>,
    /// Network interfaces by name, virtual ones included.
    pub nics: Vec<Nic>,
    /// RDMA devices by name (empty where `/sys/class/infiniband` is absent).
    pub rdma_devices: Vec<RdmaDevice>,
    /// GPUs by PCI address.
    pub gpus: Vec<Gpu>,
    /// Files that held garbage and the fields skipped because of them.
    pub warnings: Vec<String>,
}

/// Memory that is about to be sent, for choosing the NIC nearest it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryLocation {
    /// Device memory of GPU `k` ([`Gpu::index`]).
    Gpu(u32),
    /// Host memory on a NUMA node.
    Numa(u32),
    /// Host memory with no known placement.
    Anywhere,
}

/// The PCIe distance between two devices: the number of sysfs path components of each below
/// their deepest common ancestor, added (as Mooncake does). Two functions under one switch
/// port pair are closer than two devices under different root complexes.
pub fn pcie_distance(a: &PciLocation, b: &PciLocation) -> u32 {
    let pa: Vec<&str> = a.sysfs_path.split('/').filter(|s| !s.is_empty()).collect();
    let pb: Vec<&str> = b.sysfs_path.split('/').filter(|s| !s.is_empty()).collect();
    let common = pa.iter().zip(&pb).take_while(|(x, y)| x == y).count();
    let hops = (pa.len() - common) + (pb.len() - common);
    u32::try_from(hops).unwrap_or(u32::MAX)
}

/// True when both devices sit under the same PCI host bridge (`pciDDDD:BB` in sysfs), i.e.
/// traffic between them need not cross the CPU's root complex boundary.
pub fn same_host_bridge(a: &PciLocation, b: &PciLocation) -> bool {
    let bridge = |p: &PciLocation| {
        p.sysfs_path
            .split('/')
            .find(|c| c.starts_with("pci"))
            .map(str::to_string)
    };
    let ba = bridge(a);
    ba.is_some() && ba == bridge(b)
}

impl Topology {
    /// Discovers the live machine from `/sys` and `/proc`.
    pub fn discover() -> Result<Self, Error> {
        Self::from_root("/")
    }

    /// Discovers from a tree laid out like `/` (with `sys/` and optionally `proc/`), e.g. a
    /// recorded one in tests.
    pub fn from_root(root: impl AsRef<Path>) -> Result<Self, Error> {
        sysfs::discover(root.as_ref())
    }

    /// Discovers the live machine through hwloc 2 (I/O objects on): NUMA nodes, CPU sets,
    /// network and OpenFabrics devices with their PCI placement, and GPUs come from hwloc;
    /// link speeds, RDMA ports and GIDs (which hwloc does not report) from sysfs. Returns the
    /// same model as [`Topology::discover`].
    #[cfg(feature = "hwloc")]
    pub fn from_hwloc() -> Result<Self, Error> {
        hwloc::discover()
    }

    /// Every CPU of every node, ascending.
    pub fn cpus(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .numa_nodes
            .iter()
            .flat_map(|n| n.cpus.clone())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The interface named `name`.
    pub fn nic(&self, name: &str) -> Option<&Nic> {
        self.nics.iter().find(|n| n.name == name)
    }

    /// The RDMA device named `name`.
    pub fn rdma_device(&self, name: &str) -> Option<&RdmaDevice> {
        self.rdma_devices.iter().find(|d| d.name == name)
    }

    /// The NIC to send `memory` from: among physical interfaces that are up (all physical
    /// ones if none is), for a GPU the shortest PCIe path, then the same NUMA node, then the
    /// fastest; for a NUMA node the same node first, then the fastest. `None` when there is no
    /// physical NIC or the GPU index does not exist.
    pub fn nearest_nic(&self, memory: MemoryLocation) -> Option<&Nic> {
        let physical: Vec<&Nic> = self.nics.iter().filter(|n| !n.is_virtual()).collect();
        let up: Vec<&Nic> = physical.iter().copied().filter(|n| n.is_up()).collect();
        let candidates = if up.is_empty() { physical } else { up };
        let target = self.target(memory)?;
        candidates
            .into_iter()
            .filter_map(|n| Some((n, n.pci.as_ref()?)))
            .min_by_key(|(n, pci)| (target.key(pci), std::cmp::Reverse(n.speed_mbps)))
            .map(|(n, _)| n)
    }

    /// The RDMA device (with an active port) to send `memory` from, by the same rules as
    /// [`Topology::nearest_nic`] with port rates for speeds; software devices (rxe) count as
    /// sitting on the PCI device of their netdev.
    pub fn nearest_rdma_device(&self, memory: MemoryLocation) -> Option<&RdmaDevice> {
        let target = self.target(memory)?;
        self.rdma_devices
            .iter()
            .filter(|d| d.ports.iter().any(RdmaPort::is_active))
            .filter_map(|d| {
                let pci = d
                    .pci
                    .as_ref()
                    .or_else(|| self.nic(d.netdev()?)?.pci.as_ref())?;
                let rate = d
                    .ports
                    .iter()
                    .filter(|p| p.is_active())
                    .filter_map(|p| p.rate_gbps)
                    .fold(0.0_f64, f64::max);
                // Rates are whole or half Gbit/s; Mbit/s integers order them exactly.
                Some((d, target.key(pci), (rate * 1000.0) as u64))
            })
            .min_by_key(|(_, key, rate)| (*key, std::cmp::Reverse(*rate)))
            .map(|(d, _, _)| d)
    }

    fn target(&self, memory: MemoryLocation) -> Option<Target<'_>> {
        Some(match memory {
            MemoryLocation::Gpu(k) => {
                let gpu = self.gpus.iter().find(|g| g.index == k)?;
                Target::Pci(&gpu.pci)
            }
            MemoryLocation::Numa(n) => Target::Node(Some(n)),
            MemoryLocation::Anywhere => Target::Node(None),
        })
    }
}

/// What a NIC is measured against when choosing the nearest.
enum Target<'a> {
    Pci(&'a PciLocation),
    Node(Option<u32>),
}

impl Target<'_> {
    /// Smaller is nearer: (0 under the same host bridge else 1, 0 on the same NUMA node else
    /// 1, PCIe distance). Across host bridges the path runs through the CPU, so the NUMA node
    /// matters more than how deep each device happens to sit.
    fn key(&self, pci: &PciLocation) -> (u8, u8, u32) {
        match self {
            Self::Pci(t) => (
                u8::from(!same_host_bridge(t, pci)),
                u8::from(t.numa_node.is_none() || t.numa_node != pci.numa_node),
                pcie_distance(t, pci),
            ),
            Self::Node(Some(n)) => (0, u8::from(pci.numa_node != Some(*n)), 0),
            Self::Node(None) => (0, 0, 0),
        }
    }
}
