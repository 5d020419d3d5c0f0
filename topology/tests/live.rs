//! Discovery on the machine the tests run on: basic invariants only, since any machine will do.

use std::fs;

use kvwire_topology::{MemoryLocation, Topology};

#[test]
fn live_machine_discovery_holds_basic_invariants() {
    if !std::path::Path::new("/sys/class/net").is_dir() {
        println!("SKIPPED: no sysfs at /sys");
        return;
    }
    let list = || -> Vec<String> {
        fs::read_dir("/sys/class/net")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()
    };
    let before = list();
    let t = Topology::discover().expect("discovers the live machine");
    let after = list();
    assert!(!t.numa_nodes.is_empty());
    assert!(!t.cpus().is_empty(), "at least one CPU");
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        t.cpus().len() >= usable,
        "{} CPUs < {usable} usable",
        t.cpus().len()
    );
    // Every interface in /sys/class/net is discovered. Other tests create and remove
    // interfaces (network namespaces) concurrently, so only those listed both before and after
    // discovery must be there.
    let found: Vec<&str> = t.nics.iter().map(|n| n.name.as_str()).collect();
    for name in before.iter().filter(|n| after.contains(n)) {
        assert!(
            found.contains(&name.as_str()),
            "{name} missing from {found:?}"
        );
    }
    for nic in &t.nics {
        if let Some(pci) = &nic.pci {
            assert_eq!(pci.address.len(), 12, "{}: {}", nic.name, pci.address);
        }
    }
    for g in &t.gpus {
        assert!(g.pci.sysfs_path.contains(&g.pci.address));
    }
    // Asking for the NIC nearest host memory never panics; with a physical NIC it finds one.
    let nearest = t.nearest_nic(MemoryLocation::Anywhere);
    assert_eq!(nearest.is_some(), t.nics.iter().any(|n| !n.is_virtual()));
    println!(
        "live: {} nodes, {} CPUs, {} NICs, {} RDMA devices, {} GPUs, {} warnings",
        t.numa_nodes.len(),
        t.cpus().len(),
        t.nics.len(),
        t.rdma_devices.len(),
        t.gpus.len(),
        t.warnings.len()
    );
}
