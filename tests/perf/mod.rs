//! `kvwire perf` as two processes: over tcp and shm on loopback and across two network
//! namespaces (tests/netns/shaped-link.sh): the option exchange, a mismatch refused on both
//! sides, the perftest layout of the tables, the JSON against docs/perf-schema.json, and a
//! server that gives up on its own when no client comes.

mod schema;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvwire_tests::{kvwire_bin, ShapedLink};
use serde_json::Value;

/// A free port whose successor is free too (control on `p`, data on `p + 1`).
fn free_port() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65000 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

/// Kills the process however the test ends.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proc {
    fn spawn(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        Self(Some(cmd.spawn().expect("starting kvwire")))
    }

    /// Waits at most `limit`, then kills; panics on a hang.
    fn finish(mut self, limit: Duration, what: &str) -> Output {
        let mut c = self.0.take().unwrap();
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if c.try_wait().unwrap().is_some() {
                return c.wait_with_output().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let out = c.wait_with_output().unwrap();
        panic!(
            "{what} hung for {limit:?}\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn perf(args: &[&str]) -> Command {
    let mut c = Command::new(kvwire_bin());
    c.arg("perf").args(args);
    c
}

/// Runs a server and a client with the same `args` (plus the port); both outputs.
fn pair(server: Command, client: Command) -> (Output, Output) {
    let s = Proc::spawn(server);
    std::thread::sleep(Duration::from_millis(300));
    let c = Proc::spawn(client);
    let co = c.finish(Duration::from_secs(120), "client");
    let so = s.finish(Duration::from_secs(30), "server");
    (so, co)
}

fn loopback(args: &[&str]) -> (Output, Output) {
    let port = free_port().to_string();
    let mut s: Vec<&str> = args.to_vec();
    s.extend(["-p", &port, "--timeout", "20"]);
    let mut c = s.clone();
    c.insert(1, "127.0.0.1");
    pair(perf(&s), perf(&c))
}

#[track_caller]
fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {:?}\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
}

fn schema() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/perf-schema.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Parses the single JSON line and checks it against the schema.
#[track_caller]
fn valid_json(o: &Output, role: &str) -> Value {
    let out = text(&o.stdout);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let s = schema();
    let errs = schema::validate(&s, &s, &v, "$");
    assert!(
        errs.is_empty(),
        "{role} JSON violates the schema: {errs:#?}\n{out}"
    );
    assert_eq!(v["role"], role);
    v
}

/// The perftest layout: dashed lines around the header, the column header, a numeric row.
#[track_caller]
fn assert_bw_table(out: &str, size: u64) {
    let dashes = "-".repeat(87);
    assert!(out.lines().filter(|l| *l == dashes).count() >= 4, "{out}");
    assert!(out.contains(" Fabric          : "), "{out}");
    assert!(
        out.contains(" local address: ") && out.contains(" remote address: "),
        "{out}"
    );
    let head = " #bytes     #iterations    BW peak[MiB/sec]    BW average[MiB/sec]   MsgRate[Mpps]";
    let i = out
        .lines()
        .position(|l| l == head)
        .unwrap_or_else(|| panic!("{out}"));
    let row: Vec<&str> = out.lines().nth(i + 1).unwrap().split_whitespace().collect();
    assert_eq!(row.len(), 5, "{row:?}");
    assert_eq!(row[0].parse::<u64>().unwrap(), size);
    let avg: f64 = row[3].parse().unwrap();
    assert!(
        avg > 0.0 && row[2].parse::<f64>().unwrap() >= avg,
        "{row:?}"
    );
}

#[test]
fn write_bw_over_tcp_loopback_both_sides_print_the_table() {
    let (s, c) = loopback(&["write_bw", "-s", "65536", "-n", "300", "--fabric", "tcp"]);
    assert_ok(&s, "server");
    assert_ok(&c, "client");
    assert_bw_table(&text(&c.stdout), 65536);
    assert_bw_table(&text(&s.stdout), 65536);
    assert!(text(&c.stdout).contains("Role            : client"));
    assert!(text(&s.stdout).contains("Role            : server"));
}

#[test]
fn shm_bandwidth_latency_and_read_json_validate() {
    for test in ["write_bw", "read_bw"] {
        let (s, c) = loopback(&[test, "-a", "-n", "20", "--fabric", "shm", "--json"]);
        assert_ok(&s, "server");
        assert_ok(&c, "client");
        let cv = valid_json(&c, "client");
        let sv = valid_json(&s, "server");
        assert_eq!(cv["header"]["fabric"], "shm");
        let rows = cv["results"].as_array().unwrap();
        assert_eq!(rows.len(), 23, "-a: 2 bytes to 8 MiB");
        assert_eq!(rows[22]["MsgSize"], 8 << 20);
        assert!(rows.iter().all(|r| r["n_iterations"] == 20));
        assert_eq!(
            sv["results"], cv["results"],
            "the server reports the client's numbers"
        );
    }
    let (s, c) = loopback(&["write_lat", "-n", "50", "--fabric", "auto"]);
    assert_ok(&s, "server");
    assert_ok(&c, "client");
    let out = text(&c.stdout);
    assert!(
        out.contains("Fabric          : shm"),
        "auto on loopback is shm: {out}"
    );
    let head = out
        .lines()
        .position(|l| l.starts_with(" #bytes #iterations    t_min[usec]"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(out
        .lines()
        .nth(head)
        .unwrap()
        .contains("99.9% percentile[usec]"));
    let row: Vec<f64> = out
        .lines()
        .nth(head + 1)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(row.len(), 9);
    assert_eq!((row[0], row[1]), (2.0, 50.0));
    assert!(
        row[2] > 0.0 && row[2] <= row[4] && row[4] <= row[3],
        "{row:?}"
    );
}

#[test]
fn kv_levels_over_tcp_json_validates() {
    let (s, c) = loopback(&[
        "kv",
        "--synthetic",
        "smollm2-135m",
        "--tokens",
        "64",
        "--level",
        "raw,cg-default",
        "--json",
    ]);
    assert_ok(&s, "server");
    assert_ok(&c, "client");
    let v = valid_json(&c, "client");
    valid_json(&s, "server");
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["level"], "raw");
    let raw_fp16 = rows[0]["fp16_bytes"].as_u64().unwrap();
    assert_eq!(raw_fp16, 30 * 2 * 64 * 3 * 64 * 2);
    assert!(rows[0]["ratio"].as_f64().unwrap() <= 1.0);
    assert!(rows[1]["ratio"].as_f64().unwrap() > 3.0, "{}", rows[1]);
    assert_eq!(rows[0]["speedup_vs_raw"], 1.0);
}

#[test]
fn an_option_mismatch_is_refused_on_both_sides() {
    let port = free_port().to_string();
    let base = ["write_bw", "-p", port.as_str(), "--timeout", "10"];
    let mut s = base.to_vec();
    s.extend(["-s", "4096"]);
    let mut c = base.to_vec();
    c.insert(1, "127.0.0.1");
    c.extend(["-s", "8192"]);
    let (so, co) = pair(perf(&s), perf(&c));
    for (o, here, there) in [(&so, "4096", "8192"), (&co, "8192", "4096")] {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
        let e = text(&o.stderr);
        assert!(
            e.contains("-s/--size (or -a) is ")
                && e.contains(&format!("is {here} here, {there} at the peer")),
            "{e}"
        );
        assert!(!e.contains("panicked"));
    }
}

#[test]
fn a_server_without_a_client_gives_up_and_verbs_without_rdma_fails_clearly() {
    let port = free_port().to_string();
    let t0 = Instant::now();
    let o = Proc::spawn(perf(&["write_bw", "-p", &port, "--timeout", "1"]))
        .finish(Duration::from_secs(20), "lonely server");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no client connected"),
        "{}",
        text(&o.stderr)
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    if std::path::Path::new("/sys/class/infiniband").exists() {
        println!("SKIPPED the verbs half: this host has RDMA");
        return;
    }
    // Without RDMA both sides get through the option exchange, then fail naming the cause.
    let port = free_port().to_string();
    let server = Proc::spawn(perf(&[
        "write_bw",
        "-p",
        &port,
        "--fabric",
        "verbs",
        "--timeout",
        "5",
    ]));
    std::thread::sleep(Duration::from_millis(300));
    let c = Proc::spawn(perf(&[
        "write_bw",
        "127.0.0.1",
        "-p",
        &port,
        "--fabric",
        "verbs",
        "--timeout",
        "5",
    ]))
    .finish(Duration::from_secs(20), "verbs client");
    let s = server.finish(Duration::from_secs(20), "verbs server");
    for (o, who) in [(c, "client"), (s, "server")] {
        assert_eq!(o.status.code(), Some(1), "{who}");
        assert!(
            text(&o.stderr).contains("no RDMA support here"),
            "{who}: {}",
            text(&o.stderr)
        );
    }
}

fn in_ns(link: &ShapedLink, side: &str, args: &[&str]) -> Command {
    let mut c = link.exec(side, kvwire_bin());
    c.arg("perf").args(args);
    c
}

#[test]
fn write_bw_and_kv_across_two_network_namespaces() {
    let Some(link) = ShapedLink::up("write_bw_and_kv_across_two_network_namespaces", "1gbit")
    else {
        return;
    };
    let bw = [
        "write_bw",
        "-s",
        "1048576",
        "-n",
        "60",
        "--json",
        "--timeout",
        "20",
    ];
    let mut c = bw.to_vec();
    c.insert(1, "192.0.2.2");
    let (so, co) = pair(in_ns(&link, "b", &bw), in_ns(&link, "a", &c));
    assert_ok(&so, "server");
    assert_ok(&co, "client");
    let v = valid_json(&co, "client");
    valid_json(&so, "server");
    assert_eq!(v["header"]["link_type"], "Ethernet");
    let gbits = v["results"][0]["BW_average"].as_f64().unwrap() * 1048576.0 * 8.0 / 1e9;
    assert!(
        gbits > 0.3 && gbits < 1.1,
        "1 Gbit/s link measured at {gbits:.3} Gbit/s"
    );
    let kv = [
        "kv",
        "--synthetic",
        "smollm2-135m",
        "--tokens",
        "32",
        "--level",
        "raw,q8",
        "--timeout",
        "20",
    ];
    let mut c = kv.to_vec();
    c.insert(1, "192.0.2.2");
    let (so, co) = pair(in_ns(&link, "b", &kv), in_ns(&link, "a", &c));
    assert_ok(&so, "server");
    assert_ok(&co, "client");
    let out = text(&co.stdout);
    assert!(
        out.contains(" level        wire bytes") && out.contains(" q8  "),
        "{out}"
    );
}
