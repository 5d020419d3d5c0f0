#!/usr/bin/env python3
"""Builds the recorded sysfs trees the topology tests read.

    make-trees.py synthetic   # h100-8gpu/ and roce-host/, written by hand below
    make-trees.py record-vm   # vm/: the relevant parts of this machine's /sys and /proc

Symlinks are kept as relative symlinks, as in sysfs (class/net/X -> ../../devices/...).
"""
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class Tree:
    def __init__(self, name):
        self.root = os.path.join(HERE, name)
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)

    def file(self, rel, text):
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")

    def link(self, rel, target_rel):
        """A relative symlink at rel pointing at target_rel (both relative to the root)."""
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        target = os.path.relpath(os.path.join(self.root, target_rel), os.path.dirname(path))
        os.symlink(target, path)

    def pci(self, devpath, cls, vendor, device, node):
        addr = devpath.rsplit("/", 1)[1]
        self.file(f"{devpath}/class", cls)
        self.file(f"{devpath}/vendor", vendor)
        self.file(f"{devpath}/device", device)
        self.file(f"{devpath}/numa_node", str(node))
        self.link(f"sys/bus/pci/devices/{addr}", devpath)

    def netdev(self, devpath, name, speed, state, mac):
        d = f"{devpath}/net/{name}"
        self.file(f"{d}/speed", str(speed))
        self.file(f"{d}/operstate", state)
        self.file(f"{d}/address", mac)
        self.link(f"sys/class/net/{name}", d)

    def virtual_netdev(self, name, state, mac):
        d = f"sys/devices/virtual/net/{name}"
        self.file(f"{d}/operstate", state)
        self.file(f"{d}/address", mac)
        self.link(f"sys/class/net/{name}", d)

    def rdma(self, devdir, name, state, rate, layer, gids):
        d = f"{devdir}/infiniband/{name}"
        p = f"{d}/ports/1"
        self.file(f"{p}/state", state)
        self.file(f"{p}/rate", rate)
        self.file(f"{p}/link_layer", layer)
        for idx, (gid, kind, ndev) in enumerate(gids):
            self.file(f"{p}/gids/{idx}", gid)
            self.file(f"{p}/gid_attrs/types/{idx}", kind)
            self.file(f"{p}/gid_attrs/ndevs/{idx}", ndev)
        # An unused slot: zero GID (the kernel's type file gives EINVAL; we omit it).
        self.file(f"{p}/gids/{len(gids)}", "0000:0000:0000:0000:0000:0000:0000:0000")
        self.link(f"sys/class/infiniband/{name}", d)


def roce_gids(ndev, mac_suffix, ipv4):
    a, b, c, d = ipv4
    ll = f"fe80:0000:0000:0000:{mac_suffix}"
    v4 = f"0000:0000:0000:0000:0000:ffff:{a:02x}{b:02x}:{c:02x}{d:02x}"
    return [
        (ll, "IB/RoCE v1", ndev),
        (ll, "RoCE v2", ndev),
        (v4, "IB/RoCE v1", ndev),
        (v4, "RoCE v2", ndev),
    ]


def h100():
    """2 sockets, 8 H100s, 8 ConnectX NICs: GPU k and NIC k share a PCIe switch under their
    own root complex; roots 0-3 on node 0, 4-7 on node 1. NICs 0-5 are 400 Gbit/s, 6-7 are
    200 Gbit/s, and NIC 7's link is down. Plus a 1 Gbit/s management NIC (no RDMA), lo and
    docker0."""
    t = Tree("h100-8gpu")
    t.file("sys/devices/system/node/node0/cpulist", "0-47,96-143")
    t.file("sys/devices/system/node/node1/cpulist", "48-95,144-191")
    t.file("sys/devices/system/cpu/online", "0-191")
    roots = [0x1a, 0x3c, 0x4d, 0x5e, 0x9a, 0xbc, 0xcd, 0xde]
    for k, r in enumerate(roots):
        node = 0 if k < 4 else 1
        rp = f"sys/devices/pci0000:{r:02x}/0000:{r:02x}:01.0"
        up = f"{rp}/0000:{r+1:02x}:00.0"  # switch upstream port
        gpu_dsp = f"{up}/0000:{r+2:02x}:00.0"
        nic_dsp = f"{up}/0000:{r+2:02x}:01.0"
        gpu = f"{gpu_dsp}/0000:{r+3:02x}:00.0"
        nic = f"{nic_dsp}/0000:{r+4:02x}:00.0"
        for bridge in (rp, up, gpu_dsp, nic_dsp):
            t.pci(bridge, "0x060400", "0x10b5", "0xc010", node)
        t.pci(gpu, "0x030200", "0x10de", "0x2330", node)
        t.file(
            f"proc/driver/nvidia/gpus/0000:{r+3:02x}:00.0/information",
            "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 100\nBus Location: \t "
            f"0000:{r+3:02x}:00.0",
        )
        t.pci(nic, "0x020000", "0x15b3", "0x1021", node)
        speed = 400000 if k < 6 else 200000
        netdev = f"enp{r+4}s0np0"
        down = k == 7
        t.netdev(nic, netdev, -1 if down else speed, "down" if down else "up",
                 f"b8:3f:d2:00:00:{k:02x}")
        rate = "400 Gb/sec (4X NDR)" if k < 6 else "200 Gb/sec (4X HDR)"
        t.rdma(nic, f"mlx5_{k}", "1: DOWN" if down else "4: ACTIVE", rate, "Ethernet",
               roce_gids(netdev, f"ba3f:d2ff:fe00:00{k:02x}", (10, 0, k, 1)))
    mgmt = "sys/devices/pci0000:00/0000:00:1c.0/0000:03:00.0"
    t.pci("sys/devices/pci0000:00/0000:00:1c.0", "0x060400", "0x8086", "0x1bb8", 0)
    t.pci(mgmt, "0x020000", "0x8086", "0x1533", 0)
    t.netdev(mgmt, "eno1", 1000, "up", "3c:ec:ef:00:00:01")
    t.virtual_netdev("lo", "unknown", "00:00:00:00:00:00")
    t.virtual_netdev("docker0", "down", "02:42:ac:11:00:01")


def roce_host():
    """One 25 Gbit/s Ethernet NIC with soft-RoCE (rxe0) on it; a kernel without NUMA (no
    node directory); the NIC reports numa_node -1; a virtio VGA that is not a GPU."""
    t = Tree("roce-host")
    t.file("sys/devices/system/cpu/online", "0-7")
    nic = "sys/devices/pci0000:00/0000:00:02.0/0000:01:00.0"
    t.pci("sys/devices/pci0000:00/0000:00:02.0", "0x060400", "0x8086", "0x29c1", -1)
    t.pci(nic, "0x020000", "0x8086", "0x159b", -1)
    t.netdev(nic, "ens5f0", 25000, "up", "52:54:00:12:34:56")
    t.pci("sys/devices/pci0000:00/0000:00:01.0", "0x030000", "0x1af4", "0x1050", -1)
    t.virtual_netdev("lo", "unknown", "00:00:00:00:00:00")
    t.rdma("sys/devices/virtual", "rxe0", "4: ACTIVE", "25 Gb/sec (1X EDR)", "Ethernet",
           roce_gids("ens5f0", "5054:00ff:fe12:3456", (192, 168, 1, 10)))


def record_vm():
    """Copies this machine's CPU/node/net/infiniband/PCI attributes into vm/."""
    t = Tree("vm")
    wanted_files = ["cpulist", "online", "speed", "operstate", "address", "numa_node",
                    "class", "vendor", "device", "state", "rate", "link_layer"]

    def copy_file(src):
        try:
            with open(src) as f:
                text = f.read().strip()
        except OSError:
            return  # sysfs reads can fail (EINVAL for a down link's speed): leave it out
        t.file(src.lstrip("/"), text)

    def copy_link(src):
        real = os.path.realpath(src)
        t.link(src.lstrip("/"), real.lstrip("/"))
        return real

    copy_file("/sys/devices/system/cpu/online")
    node_dir = "/sys/devices/system/node"
    for n in sorted(os.listdir(node_dir)) if os.path.isdir(node_dir) else []:
        if n.startswith("node") and n[4:].isdigit():
            copy_file(f"{node_dir}/{n}/cpulist")
    for cls in ["/sys/class/net", "/sys/class/infiniband", "/sys/bus/pci/devices"]:
        if not os.path.isdir(cls):
            continue
        for name in sorted(os.listdir(cls)):
            real = copy_link(f"{cls}/{name}")
            # The device's own attributes and those of every PCI ancestor (for numa_node).
            d = real
            while d.startswith("/sys/devices/"):
                for attr in wanted_files:
                    p = f"{d}/{attr}"
                    if os.path.isfile(p) and not os.path.exists(os.path.join(t.root, p[1:])):
                        copy_file(p)
                d = os.path.dirname(d)
            ports = f"{real}/ports"
            if os.path.isdir(ports):
                for port in os.listdir(ports):
                    for sub in ["state", "rate", "link_layer"]:
                        copy_file(f"{ports}/{port}/{sub}")
                    for g in os.listdir(f"{ports}/{port}/gids"):
                        for f in ["gids", "gid_attrs/types", "gid_attrs/ndevs"]:
                            copy_file(f"{ports}/{port}/{f}/{g}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "synthetic":
        h100()
        roce_host()
    elif what == "record-vm":
        record_vm()
    else:
        sys.exit(__doc__)
