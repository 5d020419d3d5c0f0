//! Discovery on the recorded sysfs trees in `testdata/` (built by `testdata/make-trees.py`).

use std::path::PathBuf;

use kvwire_topology::{
    pcie_distance, GidType, LinkLayer, MemoryLocation, PeerInfo, TierKind, Topology,
};

fn tree(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn load(name: &str) -> Topology {
    let t = Topology::from_root(tree(name)).expect("recorded tree loads");
    assert!(t.warnings.is_empty(), "{name}: {:?}", t.warnings);
    t
}

#[test]
fn h100_node_has_two_numa_nodes_of_96_cpus() {
    let t = load("h100-8gpu");
    assert_eq!(t.numa_nodes.len(), 2);
    assert_eq!(t.numa_nodes[0].cpus.len(), 96);
    assert_eq!(t.numa_nodes[1].cpus.len(), 96);
    assert_eq!(t.numa_nodes[1].cpus[0], 48);
    assert_eq!(t.cpus().len(), 192);
}

#[test]
fn h100_node_nics_speeds_and_pci() {
    let t = load("h100-8gpu");
    // 8 ConnectX + eno1 + docker0 + lo.
    assert_eq!(t.nics.len(), 11);
    assert_eq!(t.nics.iter().filter(|n| !n.is_virtual()).count(), 9);
    let n0 = t.nic("enp30s0np0").expect("NIC 0");
    assert_eq!(n0.speed_mbps, Some(400_000));
    let pci = n0.pci.as_ref().expect("PCI");
    assert_eq!(pci.address, "0000:1e:00.0");
    assert_eq!(pci.numa_node, Some(0));
    assert_eq!(t.nic("enp209s0np0").unwrap().speed_mbps, Some(200_000)); // NIC 6
    let down = t.nic("enp226s0np0").unwrap(); // NIC 7: link down, speed -1
    assert_eq!(down.speed_mbps, None);
    assert!(!down.is_up());
    assert_eq!(t.nic("eno1").unwrap().speed_mbps, Some(1000));
    assert!(t.nic("lo").unwrap().is_virtual());
}

#[test]
fn h100_node_rdma_ports_gids_and_netdevs() {
    let t = load("h100-8gpu");
    assert_eq!(t.rdma_devices.len(), 8);
    let names: Vec<&str> = t.rdma_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names[0], "mlx5_0");
    let d = t.rdma_device("mlx5_2").unwrap();
    assert_eq!(d.pci.as_ref().unwrap().address, "0000:51:00.0");
    assert_eq!(d.netdev(), Some("enp81s0np0"));
    let p = &d.ports[0];
    assert_eq!(p.number, 1);
    assert_eq!(p.state, "ACTIVE");
    assert_eq!(p.rate_gbps, Some(400.0));
    assert_eq!(p.link_layer, Some(LinkLayer::Ethernet));
    assert_eq!(p.gids.len(), 4, "the zero slot is skipped");
    assert_eq!(p.gids[0].kind, Some(GidType::IbRoceV1));
    assert_eq!(p.gids[1].kind, Some(GidType::RoceV2));
    let g = p.preferred_gid().unwrap();
    assert_eq!(g.index, 3);
    assert_eq!(g.gid, "0000:0000:0000:0000:0000:ffff:0a00:0201"); // 10.0.2.1
    assert_eq!(t.rdma_device("mlx5_7").unwrap().ports[0].state, "DOWN");
    assert_eq!(
        t.rdma_device("mlx5_6").unwrap().ports[0].rate_gbps,
        Some(200.0)
    );
}

#[test]
fn h100_node_gpus_in_pci_order_with_nvidia_model() {
    let t = load("h100-8gpu");
    assert_eq!(t.gpus.len(), 8);
    assert_eq!(t.gpus[0].pci.address, "0000:1d:00.0");
    assert_eq!(t.gpus[7].pci.address, "0000:e1:00.0");
    assert_eq!(t.gpus[5].pci.numa_node, Some(1));
    assert!(t
        .gpus
        .iter()
        .all(|g| g.vendor == 0x10de && g.device == 0x2330));
    assert_eq!(t.gpus[3].model.as_deref(), Some("NVIDIA H100 80GB HBM3"));
}

#[test]
fn h100_node_pcie_distances() {
    let t = load("h100-8gpu");
    let gpu = |k: usize| &t.gpus[k].pci;
    let nic = |name: &str| t.nic(name).unwrap().pci.clone().unwrap();
    // GPU 0 and NIC 0: downstream port + device on each side of the shared switch.
    assert_eq!(pcie_distance(gpu(0), &nic("enp30s0np0")), 4);
    // GPU 0 and NIC 1: different root complexes, 5 components each below sys/devices.
    assert_eq!(pcie_distance(gpu(0), &nic("enp64s0np0")), 10);
    // GPU 0 and the management NIC under pci0000:00: 5 + 3.
    assert_eq!(pcie_distance(gpu(0), &nic("eno1")), 8);
    assert_eq!(pcie_distance(gpu(0), gpu(0)), 0);
    assert_eq!(pcie_distance(gpu(0), gpu(1)), pcie_distance(gpu(1), gpu(0)));
}

#[test]
fn h100_node_nearest_nic_per_gpu() {
    let t = load("h100-8gpu");
    let expect = [
        "enp30s0np0",
        "enp64s0np0",
        "enp81s0np0",
        "enp98s0np0",
        "enp158s0np0",
        "enp192s0np0",
        "enp209s0np0",
        // NIC 7 is down. Every other NIC is under another root complex; the management NIC
        // has the shortest path by component count (8 < 10) but sits on node 0, so the
        // fastest up NIC on GPU 7's node (1), NIC 4, wins.
        "enp158s0np0",
    ];
    for (k, want) in expect.iter().enumerate() {
        let got = t.nearest_nic(MemoryLocation::Gpu(k as u32)).unwrap();
        assert_eq!(&got.name, want, "GPU {k}");
    }
    assert!(t.nearest_nic(MemoryLocation::Gpu(8)).is_none());
    assert_eq!(
        t.nearest_nic(MemoryLocation::Numa(1)).unwrap().name,
        "enp158s0np0"
    );
    assert_eq!(
        t.nearest_nic(MemoryLocation::Numa(0)).unwrap().name,
        "enp30s0np0"
    );
    assert_eq!(
        t.nearest_rdma_device(MemoryLocation::Gpu(6)).unwrap().name,
        "mlx5_6"
    );
    assert_eq!(
        t.nearest_rdma_device(MemoryLocation::Gpu(7)).unwrap().name,
        "mlx5_4"
    );
}

#[test]
fn h100_to_h100_tiers_rank_roce_over_tcp() {
    let t = load("h100-8gpu");
    let tiers = t.tiers_to(&PeerInfo::remote(&t));
    let kinds: Vec<TierKind> = tiers.iter().map(|t| t.kind).collect();
    assert_eq!(kinds, [TierKind::Roce, TierKind::Tcp]);
    assert_eq!(tiers[0].nominal_gbps, Some(400.0));
    assert_eq!(tiers[0].local_device.as_deref(), Some("mlx5_0:1"));
    assert_eq!(tiers[1].nominal_gbps, Some(400.0));
    assert_eq!(tiers[1].local_device.as_deref(), Some("enp30s0np0"));
    let same = t.tiers_to(&PeerInfo::same_host());
    assert_eq!(same[0].kind, TierKind::SharedMemory);
}

#[test]
fn h100_to_roce_host_is_limited_by_the_slower_end() {
    let h = load("h100-8gpu");
    let r = load("roce-host");
    let tiers = h.tiers_to(&PeerInfo::remote(&r));
    assert_eq!(tiers[0].kind, TierKind::Roce);
    assert_eq!(tiers[0].nominal_gbps, Some(25.0));
    // A faster TCP path than RDMA ranks first: an InfiniBand-less peer with a 100G NIC and
    // a 10G RoCE port.
    let peer = PeerInfo {
        same_host: false,
        infiniband_gbps: Some(800.0),
        roce_gbps: Some(10.0),
        tcp_gbps: Some(100.0),
    };
    let kinds: Vec<TierKind> = h.tiers_to(&peer).iter().map(|t| t.kind).collect();
    assert_eq!(
        kinds,
        [TierKind::Tcp, TierKind::Roce],
        "no local IB port, so no IB tier"
    );
}

#[test]
fn roce_host_without_numa_has_one_node_and_rxe_on_its_netdev() {
    let t = load("roce-host");
    assert_eq!(t.numa_nodes.len(), 1);
    assert_eq!(t.numa_nodes[0].cpus, (0..8).collect::<Vec<u32>>());
    assert!(t.gpus.is_empty(), "a virtio VGA is not a GPU");
    let nic = t.nic("ens5f0").unwrap();
    assert_eq!(nic.speed_mbps, Some(25_000));
    assert_eq!(nic.pci.as_ref().unwrap().numa_node, None);
    let rxe = t.rdma_device("rxe0").unwrap();
    assert!(rxe.pci.is_none(), "soft-RoCE is a virtual device");
    assert_eq!(rxe.netdev(), Some("ens5f0"));
    let g = rxe.ports[0].preferred_gid().unwrap();
    assert_eq!(g.gid, "0000:0000:0000:0000:0000:ffff:c0a8:010a"); // 192.168.1.10
    assert_eq!(g.kind, Some(GidType::RoceV2));
    // rxe has no PCI device; its netdev's is used.
    assert_eq!(
        t.nearest_rdma_device(MemoryLocation::Numa(0)).unwrap().name,
        "rxe0"
    );
    assert_eq!(
        t.nearest_nic(MemoryLocation::Anywhere).unwrap().name,
        "ens5f0"
    );
}

#[test]
fn recorded_vm_matches_this_kind_of_machine() {
    let t = load("vm");
    assert_eq!(t.numa_nodes.len(), 1);
    assert_eq!(t.cpus(), [0, 1]);
    assert!(t.rdma_devices.is_empty());
    assert!(t.gpus.is_empty());
    let eth0 = t.nic("eth0").unwrap();
    // virtio-net sits under a virtio bus device under its PCI function.
    assert_eq!(eth0.pci.as_ref().unwrap().address, "0000:00:03.0");
    assert_eq!(eth0.speed_mbps, None, "virtio reports speed -1");
    assert!(t.nic("lo").unwrap().is_virtual());
    assert_eq!(
        t.nearest_nic(MemoryLocation::Anywhere).unwrap().name,
        "eth0"
    );
    let tiers = t.tiers_to(&PeerInfo::default());
    assert_eq!(tiers.len(), 1);
    assert_eq!(tiers[0].kind, TierKind::Tcp);
    assert_eq!(tiers[0].nominal_gbps, None);
}

#[test]
fn model_round_trips_through_json() {
    let t = load("h100-8gpu");
    let json = serde_json::to_string(&t).unwrap();
    let back: Topology = serde_json::from_str(&json).unwrap();
    assert_eq!(back, t);
}

#[test]
fn recorded_symlinks_stay_relative_links() {
    let link = tree("h100-8gpu").join("sys/class/net/enp30s0np0");
    let target = std::fs::read_link(&link).expect("a symlink");
    assert!(target.is_relative(), "{}", target.display());
}
