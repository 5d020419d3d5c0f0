//! Link estimates kept across `kvwire send` runs, per peer.
//!
//! Each run is a new connection, so a `--level auto` run would otherwise probe the link every
//! time, even when the run before it measured the same link a second ago. A transfer whose
//! windows confirmed a rate leaves it on its connection ([`Link::link_estimate`]); `send` saves
//! it under (fabric, peer IP) in `$XDG_CACHE_HOME/kvwire/links-v1`, and the next run to that
//! peer within [`LinkEstimate::TTL`] hands it to its new connection, which then starts from it
//! rather than probing. The Linux kernel keeps per-destination TCP metrics across connections
//! for the same reason.
//!
//! [`Link::link_estimate`]: kvwire_transport::Link::link_estimate

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvwire_transport::policy::LinkEstimate;

/// Largest file read back, and most peers kept (the most recently measured).
const MAX_FILE: u64 = 16 * 1024;
const MAX_PEERS: usize = 64;

/// One saved estimate.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    fabric: String,
    peer: IpAddr,
    rate: f64,
    rtt_ns: u64,
    wire_cpu_ps: u64,
    /// When it was measured, ms since the Unix epoch.
    at_ms: u64,
}

/// The IP address `connect` (host:port) resolves to first, if any.
pub(crate) fn peer_ip(connect: &str) -> Option<IpAddr> {
    connect.to_socket_addrs().ok()?.next().map(|a| a.ip())
}

/// The saved estimate for `peer` over `fabric`, if one is fresh.
pub(crate) fn load(fabric: &str, peer: IpAddr) -> Option<LinkEstimate> {
    load_from(&path()?, fabric, peer)
}

/// Saves `estimate` for `peer` over `fabric`; a failure to write only costs the next run a
/// probe, so it is logged, not returned.
pub(crate) fn save(fabric: &str, peer: IpAddr, estimate: &LinkEstimate) {
    if let Some(p) = path() {
        save_to(&p, fabric, peer, estimate);
    }
}

fn load_from(p: &Path, fabric: &str, peer: IpAddr) -> Option<LinkEstimate> {
    let text = read_bounded(p)?;
    let e = parse(&text)
        .into_iter()
        .find(|e| e.fabric == fabric && e.peer == peer)?;
    let age = now_ms().checked_sub(e.at_ms)?;
    let estimate = LinkEstimate {
        rate: e.rate,
        rtt: Duration::from_nanos(e.rtt_ns),
        wire_cpu: e.wire_cpu_ps as f64 * 1e-12,
        measured_at: Instant::now().checked_sub(Duration::from_millis(age))?,
    };
    estimate.is_fresh(Instant::now()).then_some(estimate)
}

fn save_to(p: &Path, fabric: &str, peer: IpAddr, estimate: &LinkEstimate) {
    let mut entries = read_bounded(p).map(|t| parse(&t)).unwrap_or_default();
    entries.retain(|e| !(e.fabric == fabric && e.peer == peer));
    // First, so that among equally old entries the one just measured is kept.
    entries.insert(
        0,
        Entry {
            fabric: fabric.to_string(),
            peer,
            rate: estimate.rate,
            rtt_ns: estimate.rtt.as_nanos() as u64,
            wire_cpu_ps: (estimate.wire_cpu * 1e12) as u64,
            at_ms: now_ms().saturating_sub(estimate.measured_at.elapsed().as_millis() as u64),
        },
    );
    entries.sort_by_key(|e| std::cmp::Reverse(e.at_ms));
    entries.truncate(MAX_PEERS);
    // Written aside and renamed, so that a concurrent run reads the old file or the new one.
    let tmp = p.with_extension(format!("tmp{}", std::process::id()));
    let write = p
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, format(&entries)))
        .and_then(|()| std::fs::rename(&tmp, p));
    if let Err(e) = write {
        let _ = std::fs::remove_file(&tmp);
        eprintln!(
            "kvwire: note: cannot keep the link estimate in {}: {e}",
            p.display()
        );
    }
}

fn path() -> Option<PathBuf> {
    let calibration = kvwire_transport::policy::calib::cache_path()?;
    Some(calibration.parent()?.join("links-v1"))
}

fn read_bounded(p: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(p)
        .ok()?
        .take(MAX_FILE)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One line per peer: `fabric ip rate_bytes_per_s rtt_ns wire_cpu_ps measured_unix_ms`.
fn format(entries: &[Entry]) -> String {
    let mut s = String::from("kvwire-links 1\n");
    for e in entries {
        s += &format!(
            "{} {} {:.0} {} {} {}\n",
            e.fabric, e.peer, e.rate, e.rtt_ns, e.wire_cpu_ps, e.at_ms
        );
    }
    s
}

/// The entries of a file [`format`] wrote; lines that do not parse (a truncated write, a
/// later version's fields) are skipped.
fn parse(text: &str) -> Vec<Entry> {
    let mut lines = text.lines();
    if lines.next() != Some("kvwire-links 1") {
        return Vec::new();
    }
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let [fabric, peer, rate, rtt, cpu, at] = f[..] else {
                return None;
            };
            let rate: f64 = rate.parse().ok()?;
            (rate.is_finite() && rate > 0.0).then_some(())?;
            Some(Entry {
                fabric: fabric.to_string(),
                peer: peer.parse().ok()?,
                rate,
                rtt_ns: rtt.parse().ok()?,
                wire_cpu_ps: cpu.parse().ok()?,
                at_ms: at.parse().ok()?,
            })
        })
        .take(MAX_PEERS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(peer: &str, at_ms: u64) -> Entry {
        Entry {
            fabric: "tcp".into(),
            peer: peer.parse().unwrap(),
            rate: 1.25e9,
            rtt_ns: 80_000,
            wire_cpu_ps: 400,
            at_ms,
        }
    }

    #[test]
    fn entries_round_trip_and_bad_lines_are_skipped() {
        let es = vec![entry("192.0.2.2", 5), entry("::1", 7)];
        assert_eq!(parse(&format(&es)), es);
        let mut text = format(&es);
        text += "tcp 10.0.0.1 NaN 1 1 1\ntcp not-an-ip 1 1 1 1\ntcp 10.0.0.2 -5 1 1 1\ntruncated\n";
        assert_eq!(parse(&text), es);
        assert!(parse("kvwire-links 2\ntcp 10.0.0.1 1 1 1 1\n").is_empty());
        assert!(parse("").is_empty());
    }

    #[test]
    fn a_saved_estimate_comes_back_while_fresh_for_its_peer_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvwire").join("links-v1");
        let load = |fabric: &str, peer: IpAddr| load_from(&file, fabric, peer);
        let save = |fabric: &str, peer: IpAddr, e: &LinkEstimate| save_to(&file, fabric, peer, e);
        let peer: IpAddr = "192.0.2.2".parse().unwrap();
        let e = LinkEstimate {
            rate: 1.2e9,
            rtt: Duration::from_micros(90),
            wire_cpu: 0.5e-9,
            measured_at: Instant::now(),
        };
        assert_eq!(load("tcp", peer), None);
        save("tcp", peer, &e);
        let got = load("tcp", peer).expect("fresh");
        assert!((got.rate - e.rate).abs() < 1.0);
        assert_eq!(got.rtt, e.rtt);
        assert!((got.wire_cpu - e.wire_cpu).abs() < 1e-12);
        assert_eq!(load("shm", peer), None);
        assert_eq!(load("tcp", "192.0.2.3".parse().unwrap()), None);
        // One measured past the TTL is not handed out.
        let old = LinkEstimate {
            measured_at: Instant::now() - LinkEstimate::TTL - Duration::from_secs(1),
            ..e
        };
        save("tcp", peer, &old);
        assert_eq!(load("tcp", peer), None);
        // The file keeps the most recent peers only.
        for i in 0..(MAX_PEERS + 10) {
            save("tcp", IpAddr::from([10, 0, (i / 256) as u8, i as u8]), &e);
        }
        let text = read_bounded(&file).unwrap();
        assert_eq!(parse(&text).len(), MAX_PEERS);
        assert!(load("tcp", IpAddr::from([10, 0, 0, (MAX_PEERS + 9) as u8])).is_some());
    }
}
