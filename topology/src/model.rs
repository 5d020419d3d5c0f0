//! The machine model: plain data, serde-serializable, no I/O.

use serde::{Deserialize, Serialize};

/// Where a PCI device sits: its address, its path in sysfs and its NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciLocation {
    /// PCI address, `domain:bus:device.function`, e.g. `0000:1b:00.0`.
    pub address: String,
    /// The device's canonical sysfs path relative to the root, e.g.
    /// `sys/devices/pci0000:1a/0000:1a:01.0/0000:1b:00.0`; PCIe distances are computed from it.
    pub sysfs_path: String,
    /// The NUMA node the device is attached to (`None` where the kernel reports -1 or nothing).
    pub numa_node: Option<u32>,
}

/// One NUMA node and the CPUs it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// Node number (`nodeN` in sysfs).
    pub id: u32,
    /// Logical CPU numbers of the node, ascending.
    pub cpus: Vec<u32>,
}

/// A network interface (`/sys/class/net/*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// Link speed in Mbit/s; `None` when the kernel does not know it (link down, virtual device).
    pub speed_mbps: Option<u64>,
    /// `operstate` (`up`, `down`, `unknown`, ...).
    pub operstate: String,
    /// Hardware address.
    pub mac: Option<String>,
    /// The PCI device behind the interface; `None` for virtual interfaces (lo, bridges, ifb).
    pub pci: Option<PciLocation>,
}

impl Nic {
    /// True for interfaces with no PCI device behind them.
    pub fn is_virtual(&self) -> bool {
        self.pci.is_none()
    }

    /// True when the interface reports its link up.
    pub fn is_up(&self) -> bool {
        self.operstate == "up"
    }
}

/// The kind of an RDMA GID entry (`gid_attrs/types/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GidType {
    /// InfiniBand or RoCE v1 (the kernel prints both as `IB/RoCE v1`; the port's link layer
    /// tells which).
    IbRoceV1,
    /// RoCE v2 (routable, UDP-encapsulated).
    RoceV2,
}

/// One non-empty GID table entry of an RDMA port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gid {
    /// Index in the port's GID table.
    pub index: u32,
    /// The GID as the kernel prints it (eight colon-separated groups of four hex digits).
    pub gid: String,
    /// Its type; `None` when the type file is missing or unreadable.
    pub kind: Option<GidType>,
    /// The netdev this GID belongs to (`gid_attrs/ndevs/N`), for RoCE.
    pub netdev: Option<String>,
}

impl Gid {
    /// True for an IPv4-mapped GID (`::ffff:a.b.c.d`), the one RoCE v2 peers usually route on.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.gid.starts_with("0000:0000:0000:0000:0000:ffff:")
    }
}

/// The link layer of an RDMA port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkLayer {
    /// Native InfiniBand.
    InfiniBand,
    /// Ethernet (RoCE).
    Ethernet,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdmaPort {
    /// Port number (from 1).
    pub number: u32,
    /// State word from `state` (`ACTIVE`, `DOWN`, ...), without the numeric prefix.
    pub state: String,
    /// Rate in Gbit/s from `rate` (e.g. `400 Gb/sec (4X NDR)` gives 400).
    pub rate_gbps: Option<f64>,
    /// Link layer; `None` when unreadable.
    pub link_layer: Option<LinkLayer>,
    /// Non-zero GID table entries, by index.
    pub gids: Vec<Gid>,
    /// The netdev the port sits on (RoCE), from the GID table or the PCI device's `net/`.
    pub netdev: Option<String>,
}

impl RdmaPort {
    /// True when the port state is `ACTIVE`.
    pub fn is_active(&self) -> bool {
        self.state == "ACTIVE"
    }

    /// The GID a connection should use: on Ethernet the lowest-index RoCE v2 GID, an
    /// IPv4-mapped one first; on InfiniBand the lowest index (the port GID).
    pub fn preferred_gid(&self) -> Option<&Gid> {
        match self.link_layer {
            Some(LinkLayer::InfiniBand) => self.gids.iter().min_by_key(|g| g.index),
            _ => self
                .gids
                .iter()
                .filter(|g| g.kind == Some(GidType::RoceV2))
                .min_by_key(|g| (!g.is_ipv4_mapped(), g.index)),
        }
    }
}

/// An RDMA device (`/sys/class/infiniband/*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdmaDevice {
    /// Device name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// The PCI device behind it; `None` for software devices (rxe, siw).
    pub pci: Option<PciLocation>,
    /// Its ports, by number.
    pub ports: Vec<RdmaPort>,
}

impl RdmaDevice {
    /// The netdev of its first port that has one.
    pub fn netdev(&self) -> Option<&str> {
        self.ports.iter().find_map(|p| p.netdev.as_deref())
    }
}

/// A GPU found on the PCI bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Position in [`crate::Topology::gpus`] (ordered by PCI address, as CUDA's
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID` numbers them).
    pub index: u32,
    /// PCI vendor id (0x10de NVIDIA, 0x1002 AMD, ...).
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// Model name from the NVIDIA driver (`/proc/driver/nvidia/gpus/*/information`), if loaded.
    pub model: Option<String>,
    /// Where it sits.
    pub pci: PciLocation,
}
