//! `kvwire perf`: a perftest-style benchmark of the transport. The same binary runs both
//! sides (no host: server; a host: client); the options are exchanged on a control
//! connection (port `-p`) and must match; the data moves on a connection of the fabric under
//! test (port `-p` + 1). See docs/perf.md.

mod baseline;
mod bw;
mod control;
mod kv;
mod lat;
mod options;
mod plot;
mod progress;
mod report;
mod synthetic;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvwire_transport::session::RecvSlots;
use kvwire_transport::{
    Access, Connection, Endpoint, EndpointConfig, FabricKind, Region, RegionId,
};
use serde_json::{json, Value};

pub(crate) use options::PerfArgs;

use control::{fabric_for, resolve, Control};
use options::{Exchanged, TestKind, MAX_SIZE};
use progress::Progress;
use report::{BwRow, Header, KvRow, LatRow};

/// Port of iperf3 with `--compare-baseline`: `-p` + 2.
const IPERF_PORT_OFFSET: u16 = 2;

/// Runs `kvwire perf`.
pub(crate) fn run(a: &PerfArgs) -> Result<()> {
    let ex = a.exchanged()?;
    let timeout = Duration::from_secs_f64(a.timeout);
    match &a.host {
        None => server(a, &ex, timeout),
        Some(h) => client(a, &ex, h, timeout),
    }
}

fn data_endpoint(
    a: &PerfArgs,
    fabric: FabricKind,
    ex: &Exchanged,
    timeout: Duration,
) -> Result<Endpoint> {
    let cfg = EndpointConfig {
        timeout,
        streams: ex.qps,
        max_in_flight: (ex.tx_depth as usize).max(256),
        ..EndpointConfig::new(fabric)
    };
    if fabric == FabricKind::Verbs {
        let sel = kvwire_transport::verbs::DeviceSelector {
            name: a.device.clone(),
            port: None,
            gid_index: a.gid_index,
        };
        return Ok(Endpoint::with_device(cfg, &sel)?);
    }
    Ok(Endpoint::new(cfg)?)
}

fn max_size(ex: &Exchanged) -> u64 {
    ex.sizes.iter().copied().max().unwrap_or(2).min(MAX_SIZE)
}

/// Registers the benchmark's buffer: both sides' writes and reads target offset 0.
fn bench_region(ep: &Endpoint, ex: &Exchanged) -> Result<(RegionId, Arc<Region>)> {
    let access = Access {
        remote_write: true,
        remote_read: true,
    };
    Ok(ep.register(max_size(ex) as usize, access)?)
}

/// The peer's first region we may write (and read).
fn peer_region(conn: &Connection, need: u64) -> Result<RegionId> {
    conn.peer()
        .regions
        .iter()
        .find(|r| r.access.remote_write && r.len >= need)
        .map(|r| r.id)
        .ok_or_else(|| anyhow::anyhow!("the peer advertises no writable region of {need} bytes"))
}

/// MTU and link type of the route to `peer` (`ip route get`, then sysfs).
fn link_info(fabric: FabricKind, peer: Option<IpAddr>) -> (Option<u32>, String) {
    if fabric == FabricKind::Shm {
        return (None, "Shared memory".into());
    }
    let Some(ip) = peer else {
        return (None, "Ethernet".into());
    };
    let dev = std::process::Command::new("ip")
        .args(["-o", "route", "get", &ip.to_string()])
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            let mut it = s.split_whitespace();
            it.by_ref().find(|w| *w == "dev")?;
            it.next().map(str::to_string)
        });
    let mtu = dev.as_ref().and_then(|d| {
        std::fs::read_to_string(format!("/sys/class/net/{d}/mtu"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let kind = if ip.is_loopback() {
        "Loopback"
    } else {
        "Ethernet"
    };
    (mtu, kind.into())
}

fn describe(addrs: &[String], regions: &[(RegionId, u64)]) -> String {
    let regions: Vec<String> = regions
        .iter()
        .map(|(id, len)| format!("REGION {} LEN 0x{len:x}", id.0))
        .collect();
    format!("ADDR {} {}", addrs.join(","), regions.join(" "))
}

#[allow(clippy::too_many_arguments)]
fn header(
    a: &PerfArgs,
    ex: &Exchanged,
    role: &str,
    fabric: FabricKind,
    peer_ip: Option<IpAddr>,
    ep: &Endpoint,
    conn: Option<&Connection>,
) -> Result<Header> {
    let (mut mtu, mut link_type) = link_info(fabric, peer_ip);
    let (mut device, mut gid_index) = (a.device.clone(), a.gid_index);
    if let Some(d) = ep.device() {
        mtu = Some(d.mtu_bytes());
        link_type = if d.is_ethernet() {
            "Ethernet (RoCE v2)".into()
        } else {
            "InfiniBand".into()
        };
        device = Some(d.name().to_string());
        gid_index = Some(d.gid_index());
    }
    let meta = ep.meta()?;
    let local = describe(
        &meta.addrs,
        &meta
            .regions
            .iter()
            .map(|r| (r.id, r.len))
            .collect::<Vec<_>>(),
    );
    let remote = conn.map_or_else(
        || "(one connection per level)".to_string(),
        |c| {
            let p = c.peer();
            describe(
                &p.addrs,
                &p.regions.iter().map(|r| (r.id, r.len)).collect::<Vec<_>>(),
            )
        },
    );
    Ok(Header {
        role: role.into(),
        fabric: fabric.name().into(),
        device,
        gid_index,
        connections: ex.qps,
        tx_depth: ex.tx_depth,
        mtu,
        link_type,
        local_address: local,
        remote_address: remote,
    })
}

/// Prints the results (tables or JSON) and draws the plot.
fn output(a: &PerfArgs, ex: &Exchanged, h: &Header, results: &Value, source: Value) -> Result<()> {
    let test = ex.test;
    if a.json {
        println!("{}", report::json_doc(test, h, ex, results, source));
    } else {
        report::print_header(test, h);
        if let Some(s) = source.as_str() {
            println!(" KV cache: {s}");
        }
        match test {
            TestKind::WriteBw | TestKind::ReadBw => {
                let rows: Vec<BwRow> = serde_json::from_value(results.clone())?;
                report::print_bw(&rows, ex.report_gbits);
            }
            TestKind::WriteLat => {
                let rows: Vec<LatRow> = serde_json::from_value(results.clone())?;
                report::print_lat(&rows);
            }
            TestKind::Kv => {
                let rows: Vec<KvRow> = serde_json::from_value(results.clone())?;
                report::print_kv(&rows);
            }
        }
    }
    if let Some(p) = &a.plot {
        let title = format!("kvwire perf {} ({})", test.name(), h.fabric);
        match test {
            TestKind::WriteBw | TestKind::ReadBw => {
                let rows: Vec<BwRow> = serde_json::from_value(results.clone())?;
                plot::bw(p, &title, report::bw_unit(ex.report_gbits), &rows)?;
            }
            TestKind::Kv => {
                let rows: Vec<KvRow> = serde_json::from_value(results.clone())?;
                plot::kv(p, &title, &rows)?;
            }
            TestKind::WriteLat => bail!("--plot draws bandwidth and kv runs, not write_lat"),
        }
    }
    Ok(())
}

fn server(a: &PerfArgs, ex: &Exchanged, timeout: Duration) -> Result<()> {
    let ctl = Control::accept(a.port, timeout)?;
    let r = server_session(a, ex, &ctl, timeout);
    if let Err(e) = &r {
        ctl.fail(e);
    } else {
        ctl.conn.close("");
    }
    r
}

fn server_session(a: &PerfArgs, ex: &Exchanged, ctl: &Control, timeout: Duration) -> Result<()> {
    ctl.exchange(ex)?;
    let start = ctl.recv("start")?;
    let fabric: FabricKind = start["fabric"]
        .as_str()
        .unwrap_or("")
        .parse()
        .context("the client named an unknown fabric")?;
    let peer_ip: Option<IpAddr> = start["client_ip"].as_str().and_then(|s| s.parse().ok());
    fabric_for(ex.fabric, peer_ip.unwrap_or(IpAddr::from([127, 0, 0, 1])))?;
    let ep = data_endpoint(a, fabric, ex, timeout)?;
    let data_port = a
        .port
        .checked_add(1)
        .context("-p must leave port + 1 free")?;
    if ex.test == TestKind::Kv {
        let slots = RecvSlots::register(&ep, kv::SLOTS, kv::SLOT_SIZE)?;
        let listener = ep.listen(("0.0.0.0", data_port))?;
        ctl.send(&json!({"ready": true}))?;
        kv::server(&listener, &slots, timeout, ex)?;
        let done = ctl.recv("results")?;
        let h = header(a, ex, "server", fabric, peer_ip, &ep, None)?;
        return output(a, ex, &h, &done["results"], done["source"].clone());
    }
    let (_, region) = bench_region(&ep, ex)?;
    let listener = ep.listen(("0.0.0.0", data_port))?;
    ctl.send(&json!({"ready": true}))?;
    let conn = listener
        .accept(timeout)
        .context("waiting for the data connection")?;
    let back = if ex.test == TestKind::WriteLat {
        Some(peer_region(&conn, max_size(ex))?)
    } else {
        None
    };
    let mut answered = 0u64;
    let mut data_open = true;
    let mut idle_since = Instant::now();
    let results = loop {
        // Drain the data connection (notifications of the client's writes; pings).
        // The client may close it before its results arrive on the control connection;
        // from then on only the control connection matters.
        while data_open {
            match conn.poll(Duration::from_millis(1)) {
                Ok(Some(ev)) => {
                    if let Some(b) = back {
                        lat::answer(&conn, &region, b, ev, &mut answered)?;
                    }
                }
                Ok(None) => break,
                Err(_) => data_open = false,
            }
        }
        if !data_open {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(v) = ctl.recv_within(Duration::ZERO)? {
            idle_since = Instant::now();
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                bail!("the client failed: {e}");
            }
            if v.get("results").is_some() {
                break v;
            }
            if let Some(size) = v.get("baseline").and_then(Value::as_u64) {
                serve_baseline(a, ctl, size)?;
            }
        } else if idle_since.elapsed() > timeout {
            bail!("the client sent nothing for {timeout:?}");
        }
    };
    let h = header(a, ex, "server", fabric, peer_ip, &ep, Some(&conn))?;
    output(a, ex, &h, &results["results"], Value::Null)
}

/// Server half of an iperf3 baseline for one size.
fn serve_baseline(a: &PerfArgs, ctl: &Control, _size: u64) -> Result<()> {
    if !baseline::iperf3_installed() {
        return ctl
            .send(&json!({"baseline_ready": false, "note": "iperf3 not installed on the server"}));
    }
    let port = a.port.saturating_add(IPERF_PORT_OFFSET);
    let child = baseline::iperf3_server(port)?;
    ctl.send(&json!({"baseline_ready": true}))?;
    // iperf3 -s -1 exits after its one client; reap it whatever happens.
    std::thread::spawn(move || baseline::reap(child, Duration::from_secs(3600 + 30)));
    Ok(())
}

/// This host's address on the route to `peer` (for the server's MTU lookup).
fn local_ip_towards(peer: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

fn client(a: &PerfArgs, ex: &Exchanged, host: &str, timeout: Duration) -> Result<()> {
    let addr = resolve(host, a.port)?;
    let fabric = fabric_for(ex.fabric, addr.ip())?;
    // The cache is built before connecting so that its generation does not count against
    // the server's timeouts.
    let cache = if ex.test == TestKind::Kv {
        Some(kv::load_cache(a, ex)?)
    } else {
        None
    };
    let ctl = Control::connect(addr, timeout)?;
    let r = client_session(a, ex, &ctl, addr, fabric, timeout, cache);
    if let Err(e) = &r {
        ctl.fail(e);
    } else {
        ctl.conn.close("");
    }
    r
}

fn client_session(
    a: &PerfArgs,
    ex: &Exchanged,
    ctl: &Control,
    addr: SocketAddr,
    fabric: FabricKind,
    timeout: Duration,
    cache: Option<(kvwire_codec::KvCache, String)>,
) -> Result<()> {
    ctl.exchange(ex)?;
    let ep = data_endpoint(a, fabric, ex, timeout)?;
    let region = if ex.test == TestKind::Kv {
        None
    } else {
        Some(bench_region(&ep, ex)?.1)
    };
    let local_ip = local_ip_towards(addr);
    ctl.send(&json!({"fabric": fabric.name(), "client_ip": local_ip.map(|i| i.to_string())}))?;
    ctl.recv("go-ahead")?;
    let data = SocketAddr::new(addr.ip(), a.port + 1);
    if let Some((cache, source)) = cache {
        let mut progress = Progress::new(ex.levels.len() as u64, "kv");
        let rows = kv::client(&ep, data, timeout, ex, &cache, &mut progress)?;
        progress.finish();
        let results = serde_json::to_value(&rows)?;
        let source = Value::String(source);
        ctl.send(&json!({"results": results, "source": source}))?;
        let h = header(a, ex, "client", fabric, Some(addr.ip()), &ep, None)?;
        return output(a, ex, &h, &results, source);
    }
    let region = region.context("no benchmark region")?;
    let conn = ep.connect(data).context("opening the data connection")?;
    let remote = peer_region(&conn, max_size(ex))?;
    let results = if ex.test == TestKind::WriteLat {
        let mut progress = Progress::new(ex.sizes.len() as u64, "write_lat");
        let mut rows = Vec::new();
        for &size in &ex.sizes {
            rows.push(lat::client(&conn, ctl, &region, remote, size, ex.iters)?);
            progress.step(&format!("{size} bytes"));
        }
        progress.finish();
        serde_json::to_value(rows)?
    } else {
        let target = bw::BwTarget {
            conn: &conn,
            local: &region,
            remote,
        };
        let mut progress = Progress::new(ex.sizes.len() as u64, ex.test.name());
        let mut rows = Vec::new();
        for &size in &ex.sizes {
            let base = if ex.compare_baseline {
                Some(client_baseline(a, ex, ctl, addr, fabric, size)?)
            } else {
                None
            };
            let mut row = bw::measure(&target, ctl, ex, size, &mut progress)?;
            if let Some(mut b) = base {
                if let Some(avg) = b.average {
                    b.ratio = Some(row.average / avg);
                }
                row.baseline = Some(b);
            }
            rows.push(row);
            progress.step(&format!("{size} bytes"));
        }
        progress.finish();
        serde_json::to_value(rows)?
    };
    ctl.send(&json!({"results": results}))?;
    let h = header(a, ex, "client", fabric, Some(addr.ip()), &ep, Some(&conn))?;
    output(a, ex, &h, &results, Value::Null)
}

/// The baseline for one size: iperf3 for tcp, memcpy for shm.
fn client_baseline(
    a: &PerfArgs,
    ex: &Exchanged,
    ctl: &Control,
    addr: SocketAddr,
    fabric: FabricKind,
    size: u64,
) -> Result<report::Baseline> {
    let unit = |bps: f64| report::to_unit(bps, ex.report_gbits);
    if fabric == FabricKind::Shm {
        let bps = baseline::memcpy(size, Duration::from_millis(300));
        return Ok(report::Baseline {
            tool: "memcpy".into(),
            average: Some(unit(bps)),
            ratio: None,
            note: None,
        });
    }
    let missing = |note: &str| report::Baseline {
        tool: "iperf3".into(),
        average: None,
        ratio: None,
        note: Some(note.into()),
    };
    if !baseline::iperf3_installed() {
        return Ok(missing("iperf3 not installed"));
    }
    ctl.send(&json!({"baseline": size}))?;
    let v = ctl.recv("baseline go-ahead")?;
    if v["baseline_ready"].as_bool() != Some(true) {
        return Ok(missing(
            v["note"]
                .as_str()
                .unwrap_or("iperf3 not installed on the server"),
        ));
    }
    let secs = ex.duration.map_or(2, |d| d.ceil() as u64);
    let port = a.port.saturating_add(IPERF_PORT_OFFSET);
    match baseline::iperf3_client(&addr.ip().to_string(), port, size, u32::from(ex.qps), secs) {
        Ok(bps) => Ok(report::Baseline {
            tool: "iperf3".into(),
            average: Some(unit(bps)),
            ratio: None,
            note: None,
        }),
        Err(e) => Ok(missing(&format!("iperf3 failed: {e}"))),
    }
}
