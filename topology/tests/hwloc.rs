//! With feature `hwloc`: hwloc discovery of the live machine agrees with sysfs discovery.
#![cfg(feature = "hwloc")]

use kvwire_topology::Topology;

#[test]
fn hwloc_and_sysfs_agree_on_the_live_machine() {
    let sys = Topology::discover().expect("sysfs discovery");
    let hw = Topology::from_hwloc().expect("hwloc discovery");
    let ids = |t: &Topology| t.numa_nodes.iter().map(|n| n.id).collect::<Vec<_>>();
    assert_eq!(ids(&hw), ids(&sys));
    assert_eq!(hw.cpus(), sys.cpus());
    for (a, b) in hw.numa_nodes.iter().zip(&sys.numa_nodes) {
        assert_eq!(a.cpus, b.cpus, "node {}", a.id);
    }
    // Same PCI placement of every physical interface and RDMA device. hwloc attaches a
    // device whose NUMA node the kernel does not know (-1) to the whole machine, which may
    // be a single node, so only a node sysfs knows must match.
    let nics = sys
        .nics
        .iter()
        .filter_map(|n| Some((&n.name, n.pci.as_ref()?)));
    let rdma = sys
        .rdma_devices
        .iter()
        .filter_map(|d| Some((&d.name, d.pci.as_ref()?)));
    let hw_pci = |name: &str| {
        hw.nic(name)
            .and_then(|n| n.pci.clone())
            .or_else(|| hw.rdma_device(name).and_then(|d| d.pci.clone()))
    };
    let mut checked = 0;
    for (name, s) in nics.chain(rdma) {
        let h = hw_pci(name).unwrap_or_else(|| panic!("{name}: no PCI device from hwloc"));
        assert_eq!(h.address, s.address, "{name}");
        assert_eq!(h.sysfs_path, s.sysfs_path, "{name}");
        if s.numa_node.is_some() {
            assert_eq!(h.numa_node, s.numa_node, "{name}");
        }
        checked += 1;
    }
    let addrs = |t: &Topology| {
        t.gpus
            .iter()
            .map(|g| g.pci.address.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(addrs(&hw), addrs(&sys));
    println!(
        "hwloc agrees with sysfs: {} nodes, {} CPUs, {checked} PCI devices, {} GPUs",
        hw.numa_nodes.len(),
        hw.cpus().len(),
        hw.gpus.len()
    );
}
