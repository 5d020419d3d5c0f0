//! `kvwire topo`: the machine as the transport sees it (kvwire-topology), as a tree or JSON.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use kvwire_topology::{GidType, Gpu, LinkLayer, Nic, PciLocation, RdmaDevice, Topology};

/// Arguments of `kvwire topo`.
#[derive(Debug, Args)]
pub(crate) struct TopoArgs {
    /// Print the model as JSON instead of a tree.
    #[arg(long)]
    json: bool,
    /// Read sysfs/procfs under this directory instead of `/` (e.g. a recorded tree).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

pub(crate) fn run(args: &TopoArgs) -> anyhow::Result<()> {
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let topo = Topology::from_root(&root)
        .with_context(|| format!("discovering the topology under {}", root.display()))?;
    let text = if args.json {
        serde_json::to_string_pretty(&topo)? + "\n"
    } else {
        render(&topo)
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The tree: NUMA nodes with their CPUs, and under each the devices attached to it; devices
/// with no known node under "no NUMA node"; virtual interfaces last.
fn render(t: &Topology) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "machine: {} NUMA node(s), {} CPU(s), {} NIC(s), {} RDMA device(s), {} GPU(s)",
        t.numa_nodes.len(),
        t.cpus().len(),
        t.nics.iter().filter(|n| !n.is_virtual()).count(),
        t.rdma_devices.len(),
        t.gpus.len()
    );
    let mut nodes: Vec<Option<u32>> = t.numa_nodes.iter().map(|n| Some(n.id)).collect();
    nodes.push(None);
    for node in nodes {
        let on = |p: Option<&PciLocation>| p.is_some_and(|p| p.numa_node == node);
        // Devices whose node is not among the discovered ones go under "no NUMA node" too.
        let known = |p: Option<&PciLocation>| {
            p.and_then(|p| p.numa_node)
                .is_some_and(|n| t.numa_nodes.iter().any(|x| x.id == n))
        };
        let belongs = |p: Option<&PciLocation>| {
            if node.is_some() {
                on(p)
            } else {
                p.is_some() && !known(p)
            }
        };
        let nics: Vec<&Nic> = t.nics.iter().filter(|n| belongs(n.pci.as_ref())).collect();
        let gpus: Vec<&Gpu> = t.gpus.iter().filter(|g| belongs(Some(&g.pci))).collect();
        // Software RDMA devices (rxe) follow their netdev.
        let rdma: Vec<&RdmaDevice> = t
            .rdma_devices
            .iter()
            .filter(|d| {
                let pci = d.pci.as_ref().or_else(|| t.nic(d.netdev()?)?.pci.as_ref());
                belongs(pci)
            })
            .collect();
        match node {
            Some(id) => {
                let cpus = t
                    .numa_nodes
                    .iter()
                    .find(|n| n.id == id)
                    .map(|n| cpu_ranges(&n.cpus))
                    .unwrap_or_default();
                let _ = writeln!(out, "numa node {id}: cpus {cpus}");
            }
            None if nics.is_empty() && gpus.is_empty() && rdma.is_empty() => continue,
            None => {
                let _ = writeln!(out, "no NUMA node reported:");
            }
        }
        for n in nics {
            nic_line(&mut out, n);
        }
        for d in rdma {
            rdma_lines(&mut out, d);
        }
        for g in gpus {
            let _ = writeln!(
                out,
                "  gpu {} {} [{:04x}:{:04x}] {}",
                g.index,
                g.pci.address,
                g.vendor,
                g.device,
                g.model.as_deref().unwrap_or("(model unknown)")
            );
        }
    }
    let virt: Vec<&Nic> = t.nics.iter().filter(|n| n.is_virtual()).collect();
    let soft: Vec<&RdmaDevice> = t
        .rdma_devices
        .iter()
        .filter(|d| d.pci.is_none() && d.netdev().and_then(|n| t.nic(n)?.pci.as_ref()).is_none())
        .collect();
    if !virt.is_empty() || !soft.is_empty() {
        let _ = writeln!(out, "virtual:");
        for n in virt {
            nic_line(&mut out, n);
        }
        for d in soft {
            rdma_lines(&mut out, d);
        }
    }
    for w in &t.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

fn nic_line(out: &mut String, n: &Nic) {
    let speed = n.speed_mbps.map_or_else(
        || "speed ?".to_string(),
        |s| format!("{} Gbit/s", s as f64 / 1000.0),
    );
    let addr = n.pci.as_ref().map_or("-", |p| p.address.as_str());
    let _ = writeln!(
        out,
        "  nic {} {addr} {speed} {} mac {}",
        n.name,
        n.operstate,
        n.mac.as_deref().unwrap_or("-")
    );
}

fn rdma_lines(out: &mut String, d: &RdmaDevice) {
    let addr = d.pci.as_ref().map_or("virtual", |p| p.address.as_str());
    let _ = writeln!(
        out,
        "  rdma {} {addr} on {}",
        d.name,
        d.netdev().unwrap_or("-")
    );
    for p in &d.ports {
        let layer = match p.link_layer {
            Some(LinkLayer::InfiniBand) => "InfiniBand",
            Some(LinkLayer::Ethernet) => "Ethernet",
            None => "?",
        };
        let rate = p
            .rate_gbps
            .map_or_else(|| "rate ?".to_string(), |r| format!("{r} Gbit/s"));
        let _ = writeln!(out, "    port {} {} {rate} {layer}", p.number, p.state);
        let preferred = p.preferred_gid().map(|g| g.index);
        for g in &p.gids {
            let kind = match (g.kind, p.link_layer) {
                (Some(GidType::RoceV2), _) => "RoCE v2",
                (Some(GidType::IbRoceV1), Some(LinkLayer::InfiniBand)) => "IB",
                (Some(GidType::IbRoceV1), _) => "RoCE v1",
                (None, _) => "?",
            };
            let mark = if preferred == Some(g.index) {
                " (preferred)"
            } else {
                ""
            };
            let _ = writeln!(out, "      gid {} {} {kind}{mark}", g.index, g.gid);
        }
    }
}

/// `0-47,96-143` from a sorted CPU list.
fn cpu_ranges(cpus: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    if parts.is_empty() {
        "(none)".into()
    } else {
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../topology/testdata")
            .join(name)
    }

    #[test]
    fn cpu_ranges_compress_runs() {
        assert_eq!(cpu_ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_ranges(&[]), "(none)");
    }

    #[test]
    fn h100_tree_lists_devices_under_their_node() {
        let t = Topology::from_root(tree("h100-8gpu")).unwrap();
        let text = render(&t);
        assert!(text.starts_with(
            "machine: 2 NUMA node(s), 192 CPU(s), 9 NIC(s), 8 RDMA device(s), 8 GPU(s)\n"
        ));
        let node1 = text.find("numa node 1: cpus 48-95,144-191").unwrap();
        let gpu7 = text
            .find("  gpu 7 0000:e1:00.0 [10de:2330] NVIDIA H100 80GB HBM3")
            .unwrap();
        assert!(gpu7 > node1);
        assert!(text.contains("  nic enp30s0np0 0000:1e:00.0 400 Gbit/s up"));
        assert!(text
            .contains("      gid 3 0000:0000:0000:0000:0000:ffff:0a00:0001 RoCE v2 (preferred)"));
        assert!(text.contains("virtual:\n  nic docker0"));
    }

    #[test]
    fn roce_host_tree_puts_rxe_beside_its_netdev() {
        let t = Topology::from_root(tree("roce-host")).unwrap();
        let text = render(&t);
        let unplaced = text.find("no NUMA node reported:").unwrap();
        let rxe = text.find("  rdma rxe0 virtual on ens5f0").unwrap();
        assert!(rxe > unplaced);
        assert!(!text.contains("virtual:\n  rdma"));
    }
}
