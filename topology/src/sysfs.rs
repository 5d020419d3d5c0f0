//! Discovery from a sysfs/procfs tree under a root directory (`/` for the live machine).
//!
//! Missing files are normal in sysfs (a down link has no speed, a virtual device no PCI
//! parent) and give `None`; a file that exists but holds garbage gives `None` plus a warning
//! in [`Topology::warnings`]. Only a root without `sys/` is an error.

use std::cmp::Ordering;
use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::model::{
    Gid, GidType, Gpu, LinkLayer, Nic, NumaNode, PciLocation, RdmaDevice, RdmaPort,
};
use crate::parse;
use crate::{Error, Topology};

/// Largest attribute file we read; sysfs attributes are one page at most.
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Most entries we take from one directory, so a strange tree cannot make us allocate
/// without bound.
const MAX_DIR_ENTRIES: usize = 4096;

pub(crate) fn discover(root: &Path) -> Result<Topology, Error> {
    let root = fs::canonicalize(root).map_err(|source| Error::Root {
        root: root.to_path_buf(),
        source,
    })?;
    if !root.join("sys").is_dir() {
        return Err(Error::NoSysfs { root });
    }
    let mut reader = Reader {
        root,
        warnings: Vec::new(),
    };
    let numa_nodes = reader.numa_nodes();
    let nics = reader.nics();
    let rdma_devices = reader.rdma_devices();
    let gpus = reader.gpus();
    Ok(Topology {
        numa_nodes,
        nics,
        rdma_devices,
        gpus,
        warnings: reader.warnings,
    })
}

struct Reader {
    root: PathBuf,
    warnings: Vec<String>,
}

impl Reader {
    fn abs(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The trimmed contents of `rel`, or `None` when it is missing, unreadable or not text.
    fn read(&self, rel: &str) -> Option<String> {
        let mut text = String::new();
        fs::File::open(self.abs(rel))
            .ok()?
            .take(MAX_FILE_BYTES)
            .read_to_string(&mut text)
            .ok()?;
        Some(text.trim().to_string())
    }

    /// Reads and parses `rel`; garbage is reported as a warning and gives `None`.
    fn parsed<T>(&mut self, rel: &str, what: &str, f: impl FnOnce(&str) -> Option<T>) -> Option<T> {
        let text = self.read(rel)?;
        let v = f(&text);
        if v.is_none() {
            self.warn(format!(
                "{rel}: cannot parse {what} from {text:?}; field skipped"
            ));
        }
        v
    }

    fn warn(&mut self, msg: String) {
        if self.warnings.len() < MAX_DIR_ENTRIES {
            self.warnings.push(msg);
        }
    }

    /// Entry names of directory `rel`, in natural order (`mlx5_2` before `mlx5_10`).
    fn list(&mut self, rel: &str) -> Vec<String> {
        let Ok(dir) = fs::read_dir(self.abs(rel)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .take(MAX_DIR_ENTRIES)
            .collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }

    /// The canonical path of `rel` relative to the root (symlinks resolved), if it stays
    /// inside the root.
    fn canonical(&self, rel: &str) -> Option<String> {
        let real = fs::canonicalize(self.abs(rel)).ok()?;
        let inside = real.strip_prefix(&self.root).ok()?;
        inside.to_str().map(str::to_string)
    }

    /// The PCI device that `canonical` (a path relative to the root) is or sits under: the
    /// last component shaped like a PCI address.
    fn pci_of(&mut self, canonical: &str) -> Option<PciLocation> {
        let path = Path::new(canonical);
        let mut deepest: Option<PathBuf> = None;
        let mut so_far = PathBuf::new();
        for c in path.components() {
            if let Component::Normal(name) = c {
                so_far.push(name);
                if name.to_str().is_some_and(parse::is_pci_address) {
                    deepest = Some(so_far.clone());
                }
            }
        }
        let dev = deepest?.to_str()?.to_string();
        let address = Path::new(&dev).file_name()?.to_str()?.to_string();
        let numa_node = self
            .parsed(&format!("{dev}/numa_node"), "a NUMA node", |t| {
                t.parse::<i64>().ok()
            })
            .and_then(|n| u32::try_from(n).ok());
        Some(PciLocation {
            address,
            sysfs_path: dev,
            numa_node,
        })
    }

    fn numa_nodes(&mut self) -> Vec<NumaNode> {
        let base = "sys/devices/system/node";
        let mut nodes = Vec::new();
        for name in self.list(base) {
            let Some(id) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cpus = self
                .parsed(
                    &format!("{base}/{name}/cpulist"),
                    "a CPU list",
                    parse::cpu_list,
                )
                .unwrap_or_default();
            nodes.push(NumaNode { id, cpus });
        }
        if nodes.is_empty() {
            // Kernels without NUMA support have no node directory: one node holds every CPU.
            let cpus = self
                .parsed(
                    "sys/devices/system/cpu/online",
                    "a CPU list",
                    parse::cpu_list,
                )
                .unwrap_or_else(|| {
                    let names = self.list("sys/devices/system/cpu");
                    names
                        .iter()
                        .filter_map(|n| n.strip_prefix("cpu")?.parse().ok())
                        .collect()
                });
            nodes.push(NumaNode { id: 0, cpus });
        }
        nodes
    }

    fn nics(&mut self) -> Vec<Nic> {
        let base = "sys/class/net";
        let mut nics = Vec::new();
        for name in self.list(base) {
            let dir = format!("{base}/{name}");
            let pci = match self.canonical(&dir) {
                Some(real) => self.pci_of(&real),
                None => None,
            };
            // `speed` is -1 or unreadable (EINVAL) when the link is down or unknown.
            let speed_mbps = self
                .parsed(&format!("{dir}/speed"), "a link speed", |t| {
                    t.parse::<i64>().ok()
                })
                .and_then(|s| u64::try_from(s).ok())
                .filter(|&s| s > 0);
            nics.push(Nic {
                speed_mbps,
                operstate: self
                    .read(&format!("{dir}/operstate"))
                    .unwrap_or_else(|| "unknown".into()),
                mac: self
                    .read(&format!("{dir}/address"))
                    .filter(|m| !m.is_empty()),
                pci,
                name,
            });
        }
        nics
    }

    fn rdma_devices(&mut self) -> Vec<RdmaDevice> {
        let base = "sys/class/infiniband";
        let mut devices = Vec::new();
        for name in self.list(base) {
            let dir = format!("{base}/{name}");
            let pci = match self.canonical(&dir) {
                Some(real) => self.pci_of(&real),
                None => None,
            };
            // A PCI RDMA device's netdevs sit beside it under the PCI function's `net/`.
            let pci_netdev = pci.as_ref().and_then(|p| {
                self.list(&format!("{}/net", p.sysfs_path))
                    .into_iter()
                    .next()
            });
            let mut ports = Vec::new();
            for port in self.list(&format!("{dir}/ports")) {
                let Ok(number) = port.parse::<u32>() else {
                    continue;
                };
                ports.push(self.port(&format!("{dir}/ports/{port}"), number, pci_netdev.clone()));
            }
            devices.push(RdmaDevice { name, pci, ports });
        }
        devices
    }

    fn port(&mut self, dir: &str, number: u32, pci_netdev: Option<String>) -> RdmaPort {
        let link_layer = self.parsed(&format!("{dir}/link_layer"), "a link layer", |t| match t {
            "InfiniBand" => Some(LinkLayer::InfiniBand),
            "Ethernet" => Some(LinkLayer::Ethernet),
            _ => None,
        });
        let mut gids = Vec::new();
        for idx in self.list(&format!("{dir}/gids")) {
            let Ok(index) = idx.parse::<u32>() else {
                continue;
            };
            let Some(gid) = self.read(&format!("{dir}/gids/{idx}")) else {
                continue;
            };
            if gid.chars().all(|c| c == '0' || c == ':') {
                continue; // an empty table slot
            }
            // The type file reads EINVAL for unused entries; garbage is warned about.
            let kind =
                self.parsed(
                    &format!("{dir}/gid_attrs/types/{idx}"),
                    "a GID type",
                    |t| match t {
                        "IB/RoCE v1" => Some(GidType::IbRoceV1),
                        "RoCE v2" => Some(GidType::RoceV2),
                        _ => None,
                    },
                );
            let netdev = self
                .read(&format!("{dir}/gid_attrs/ndevs/{idx}"))
                .filter(|n| !n.is_empty());
            gids.push(Gid {
                index,
                gid,
                kind,
                netdev,
            });
        }
        let netdev = gids.iter().find_map(|g| g.netdev.clone()).or(pci_netdev);
        RdmaPort {
            number,
            state: self
                .read(&format!("{dir}/state"))
                .map(|s| parse::port_state(&s))
                .unwrap_or_else(|| "UNKNOWN".into()),
            rate_gbps: self.parsed(&format!("{dir}/rate"), "a port rate", parse::rate_gbps),
            link_layer,
            gids,
            netdev,
        }
    }

    fn gpus(&mut self) -> Vec<Gpu> {
        let base = "sys/bus/pci/devices";
        let mut gpus = Vec::new();
        for addr in self.list(base) {
            let dir = format!("{base}/{addr}");
            let Some(class) = self
                .read(&format!("{dir}/class"))
                .and_then(|c| parse::hex_u32(&c))
            else {
                continue;
            };
            let vendor = self
                .read(&format!("{dir}/vendor"))
                .and_then(|v| parse::hex_u32(&v))
                .and_then(|v| u16::try_from(v).ok());
            let Some(vendor) = vendor else { continue };
            if !is_gpu(class, vendor) {
                continue;
            }
            let device = self
                .read(&format!("{dir}/device"))
                .and_then(|v| parse::hex_u32(&v))
                .and_then(|v| u16::try_from(v).ok())
                .unwrap_or(0);
            let Some(pci) = self.canonical(&dir).and_then(|real| self.pci_of(&real)) else {
                continue;
            };
            let model = self.nvidia_model(&pci.address);
            gpus.push(Gpu {
                index: 0,
                vendor,
                device,
                model,
                pci,
            });
        }
        gpus.sort_by(|a, b| a.pci.address.cmp(&b.pci.address));
        for (i, g) in gpus.iter_mut().enumerate() {
            g.index = u32::try_from(i).unwrap_or(u32::MAX);
        }
        gpus
    }

    /// The `Model:` line of the NVIDIA driver's per-GPU information file.
    fn nvidia_model(&self, address: &str) -> Option<String> {
        let info = self.read(&format!("proc/driver/nvidia/gpus/{address}/information"))?;
        info.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "Model").then(|| v.trim().to_string())
        })
    }
}

/// PCI class 0x0302 (3D controller: NVIDIA datacenter GPUs) from any vendor, 0x0300 (VGA)
/// only from NVIDIA and AMD (so a VM's virtual VGA or an integrated Intel chip does not count),
/// and 0x1200 (processing accelerator, AMD Instinct) from AMD.
pub(crate) fn is_gpu(class: u32, vendor: u16) -> bool {
    const NVIDIA: u16 = 0x10de;
    const AMD: u16 = 0x1002;
    match class >> 8 {
        0x0302 => true,
        0x0300 => vendor == NVIDIA || vendor == AMD,
        0x1200 => vendor == AMD,
        _ => false,
    }
}

/// Orders names with their digit runs compared as numbers (`mlx5_2` before `mlx5_10`,
/// `enp30s0` before `enp158s0`), as people expect.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(&rb) {
        let ord = match (x, y) {
            ((true, dx), (true, dy)) => {
                let (tx, ty) = (dx.trim_start_matches('0'), dy.trim_start_matches('0'));
                tx.len().cmp(&ty.len()).then(tx.cmp(ty))
            }
            _ => x.1.cmp(y.1),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ra.len().cmp(&rb.len()).then(a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::natural_cmp;
    use std::cmp::Ordering;

    #[test]
    fn natural_order() {
        assert_eq!(natural_cmp("mlx5_2", "mlx5_10"), Ordering::Less);
        assert_eq!(natural_cmp("enp30s0np0", "enp158s0np0"), Ordering::Less);
        assert_eq!(natural_cmp("eth0", "eth0"), Ordering::Equal);
        assert_eq!(natural_cmp("lo", "eth0"), Ordering::Greater);
    }
}
