//! Discovery through hwloc 2 (feature `hwloc`, via hwlocality) with its I/O objects kept.
//!
//! hwloc supplies the NUMA nodes with their CPU sets, which OS devices exist (network
//! interfaces, OpenFabrics devices) and the PCI device and NUMA node each sits on, and the
//! GPUs among PCI devices. hwloc does not report link speeds, RDMA port rates or GID types,
//! so those fields, and the sysfs paths used for PCIe distances, come from sysfs under `/`.

use std::path::Path;

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;

use crate::model::{Gpu, NumaNode, PciLocation};
use crate::{sysfs, Error, Topology};

pub(crate) fn discover() -> Result<Topology, Error> {
    let hw = hwlocality::Topology::builder()
        .with_io_type_filter(TypeFilter::KeepAll)
        .map_err(|e| Error::Hwloc(format!("setting the I/O type filter: {e}")))?
        .build()
        .map_err(|e| Error::Hwloc(format!("loading the topology: {e}")))?;
    let mut topo = sysfs::discover(Path::new("/"))?;

    topo.numa_nodes = hw
        .objects_with_type(ObjectType::NUMANode)
        .filter_map(|n| {
            let id = u32::try_from(n.os_index()?).ok()?;
            let mut cpus: Vec<u32> = n
                .cpuset()?
                .iter_set()
                .filter_map(|c| u32::try_from(usize::from(c)).ok())
                .collect();
            cpus.sort_unstable();
            Some(NumaNode { id, cpus })
        })
        .collect();
    topo.numa_nodes.sort_by_key(|n| n.id);

    // Network and OpenFabrics OS devices: their PCI parent and NUMA node as hwloc sees them.
    // Placement comes only from hwloc: what sysfs found is kept aside for its paths.
    let sysfs_nics: Vec<Option<PciLocation>> = topo.nics.iter_mut().map(|n| n.pci.take()).collect();
    let sysfs_rdma: Vec<Option<PciLocation>> =
        topo.rdma_devices.iter_mut().map(|d| d.pci.take()).collect();
    for os in hw.os_devices() {
        let Some(ObjectAttributes::OSDevice(attr)) = os.attributes() else {
            continue;
        };
        let Some(name) = os.name().and_then(|n| n.to_str().ok()) else {
            continue;
        };
        let placement = pci_parent(os).map(|p| (pci_address(p), numa_node(p)));
        let slot = match attr.device_type() {
            OSDeviceType::Network => topo
                .nics
                .iter_mut()
                .position(|n| n.name == name)
                .map(|i| (&mut topo.nics[i].pci, sysfs_nics[i].as_ref())),
            OSDeviceType::OpenFabrics => topo
                .rdma_devices
                .iter_mut()
                .position(|d| d.name == name)
                .map(|i| (&mut topo.rdma_devices[i].pci, sysfs_rdma[i].as_ref())),
            _ => None,
        };
        if let (Some((slot, known)), Some((Some(address), node))) = (slot, placement) {
            *slot = Some(PciLocation {
                sysfs_path: sysfs_path(&address, known),
                address,
                numa_node: node,
            });
        }
    }

    // GPUs: PCI devices of a GPU class.
    let mut gpus = Vec::new();
    for dev in hw.pci_devices() {
        let Some(ObjectAttributes::PCIDevice(pci)) = dev.attributes() else {
            continue;
        };
        // hwloc's class_id is the class and subclass (0x0302), sysfs's the full 24 bits.
        let class = u32::from(pci.class_id()) << 8;
        if !sysfs::is_gpu(class, pci.vendor_id()) {
            continue;
        }
        let Some(address) = pci_address(dev) else {
            continue;
        };
        let known = topo.gpus.iter().find(|g| g.pci.address == address);
        gpus.push(Gpu {
            index: 0,
            vendor: pci.vendor_id(),
            device: pci.device_id(),
            model: known.and_then(|g| g.model.clone()),
            pci: PciLocation {
                sysfs_path: sysfs_path(&address, known.map(|g| &g.pci)),
                numa_node: numa_node(dev),
                address,
            },
        });
    }
    gpus.sort_by(|a, b| a.pci.address.cmp(&b.pci.address));
    for (i, g) in gpus.iter_mut().enumerate() {
        g.index = u32::try_from(i).unwrap_or(u32::MAX);
    }
    topo.gpus = gpus;
    Ok(topo)
}

/// The nearest PCI device at or above `obj`.
fn pci_parent(obj: &TopologyObject) -> Option<&TopologyObject> {
    std::iter::once(obj)
        .chain(obj.ancestors())
        .find(|o| o.object_type() == ObjectType::PCIDevice)
}

fn pci_address(dev: &TopologyObject) -> Option<String> {
    let Some(ObjectAttributes::PCIDevice(p)) = dev.attributes() else {
        return None;
    };
    Some(format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        p.domain(),
        p.bus_id(),
        p.bus_device(),
        p.function()
    ))
}

/// The single NUMA node of the first normal ancestor (none when it spans several).
fn numa_node(dev: &TopologyObject) -> Option<u32> {
    let set = dev.first_non_io_ancestor()?.nodeset()?;
    let mut nodes = set.iter_set();
    let first = nodes.next()?;
    if nodes.next().is_some() {
        return None;
    }
    u32::try_from(usize::from(first)).ok()
}

/// The sysfs path sysfs discovery found for `address`, or the usual one.
fn sysfs_path(address: &str, known: Option<&PciLocation>) -> String {
    match known {
        Some(k) if k.address == address => k.sysfs_path.clone(),
        _ => std::fs::canonicalize(format!("/sys/bus/pci/devices/{address}"))
            .ok()
            .and_then(|p| Some(p.to_str()?.trim_start_matches('/').to_string()))
            .unwrap_or_else(|| format!("sys/bus/pci/devices/{address}")),
    }
}
