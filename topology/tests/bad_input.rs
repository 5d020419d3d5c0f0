//! Modified copies of the recorded trees: garbage values give a skipped field and a warning,
//! bad roots a clear error, nothing panics; and an InfiniBand variant of the H100 node.

use std::fs;
use std::path::{Path, PathBuf};

use kvwire_topology::{Error, LinkLayer, PeerInfo, TierKind, Topology};

/// A private copy of a recorded tree (symlinks kept), removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let meta = fs::symlink_metadata(&src).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if meta.is_dir() {
            copy_tree(&src, &dst);
        } else {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

fn scratch(tree: &str, tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("kvwire-topo-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(tree);
    copy_tree(&src, &dir);
    Scratch(dir)
}

#[test]
fn garbage_values_skip_the_field_with_a_warning() {
    let s = scratch("roce-host", "garbage");
    let root = &s.0;
    let nic = root.join("sys/devices/pci0000:00/0000:00:02.0/0000:01:00.0");
    let port = root.join("sys/devices/virtual/infiniband/rxe0/ports/1");
    fs::write(nic.join("net/ens5f0/speed"), "fast\n").unwrap();
    fs::write(nic.join("numa_node"), "\u{0}\u{1}zz").unwrap();
    fs::write(port.join("rate"), "lots Gb/sec\n").unwrap();
    fs::write(port.join("gid_attrs/types/3"), "RoCE v9\n").unwrap();
    fs::write(root.join("sys/devices/system/cpu/online"), "7-0\n").unwrap();
    // A huge attribute is read only up to a bound.
    fs::write(port.join("link_layer"), vec![b'E'; 1 << 20]).unwrap();

    let t = Topology::from_root(root).expect("garbage is not fatal");
    let n = t.nic("ens5f0").unwrap();
    assert_eq!(n.speed_mbps, None);
    assert_eq!(n.pci.as_ref().unwrap().numa_node, None);
    let p = &t.rdma_device("rxe0").unwrap().ports[0];
    assert_eq!(p.rate_gbps, None);
    assert_eq!(p.link_layer, None);
    assert_eq!(p.gids[3].kind, None);
    // With GID 3's type unknown, the IPv4-mapped RoCE v2 GID is gone; the link-local v2 stays.
    assert_eq!(p.preferred_gid().map(|g| g.index), Some(1));
    assert_eq!(t.numa_nodes[0].cpus, Vec::<u32>::new());
    for needle in [
        "speed",
        "numa_node",
        "rate",
        "types/3",
        "cpu/online",
        "link_layer",
    ] {
        assert!(
            t.warnings.iter().any(|w| w.contains(needle)),
            "no warning about {needle}: {:#?}",
            t.warnings
        );
    }
}

#[test]
fn links_leaving_the_root_or_looping_are_skipped() {
    let s = scratch("roce-host", "links");
    let class = s.0.join("sys/class/net");
    std::os::unix::fs::symlink("/sys/devices/virtual/net/lo", class.join("escape")).unwrap();
    std::os::unix::fs::symlink("loop", class.join("loop")).unwrap();
    let t = Topology::from_root(&s.0).unwrap();
    assert!(t.nic("escape").unwrap().pci.is_none());
    assert!(t.nic("loop").unwrap().pci.is_none());
}

#[test]
fn a_root_without_sysfs_is_a_clear_error() {
    let s = scratch("roce-host", "nosys");
    fs::remove_dir_all(s.0.join("sys")).unwrap();
    let e = Topology::from_root(&s.0).unwrap_err();
    assert!(matches!(e, Error::NoSysfs { .. }));
    assert!(e.to_string().contains("has no sys/ directory"), "{e}");
    let e = Topology::from_root("/nonexistent/kvwire-topo").unwrap_err();
    assert!(matches!(e, Error::Root { .. }), "{e}");
}

#[test]
fn an_infiniband_port_gives_an_ib_tier_and_gid_index_0() {
    let s = scratch("h100-8gpu", "ib");
    let port = s.0.join(
        "sys/devices/pci0000:4d/0000:4d:01.0/0000:4e:00.0/0000:4f:01.0/0000:51:00.0/infiniband/mlx5_2/ports/1",
    );
    fs::write(port.join("link_layer"), "InfiniBand\n").unwrap();
    fs::write(port.join("rate"), "800 Gb/sec (4X XDR)\n").unwrap();
    let t = Topology::from_root(&s.0).unwrap();
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    let p = &t.rdma_device("mlx5_2").unwrap().ports[0];
    assert_eq!(p.link_layer, Some(LinkLayer::InfiniBand));
    assert_eq!(p.preferred_gid().unwrap().index, 0);
    let peer = PeerInfo {
        infiniband_gbps: Some(400.0),
        roce_gbps: Some(400.0),
        tcp_gbps: Some(1.0),
        ..PeerInfo::default()
    };
    let tiers = t.tiers_to(&peer);
    let kinds: Vec<TierKind> = tiers.iter().map(|t| t.kind).collect();
    // IB and RoCE both 400 (the peer's limit): IB first on the tie; TCP limited to 1.
    assert_eq!(kinds, [TierKind::InfiniBand, TierKind::Roce, TierKind::Tcp]);
    assert_eq!(tiers[0].local_device.as_deref(), Some("mlx5_2:1"));
    assert_eq!(tiers[2].nominal_gbps, Some(1.0));
}
