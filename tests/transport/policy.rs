//! `--level auto`: the policy choosing levels per block over real connections — raw-only
//! floors arrive bit-exact, slow (paced) links get compressed blocks, deadlines trade quality
//! for time, and over the two-namespace shaped link a rate lowered with `tc` mid-transfer
//! makes later blocks switch to a smaller level.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kvwire_codec::{EncodeOptions, KvCache, Level};
use kvwire_tests::{check_within_bound, fixture, fixture_head, kvwire_bin, ShapedLink};
use kvwire_transport::policy::{Calibration, LevelSpeed, PolicyOptions, PolicySummary};
use kvwire_transport::session::{send_kv, KvReceiver, RecvOptions, RecvSlots, SendOptions};
use kvwire_transport::{Endpoint, FabricKind};

use super::{config, FABRICS};

/// Fixed codec speeds (per thread) in the shape of a release build here, so the tests do not
/// depend on how fast a debug build encodes; installed as the process's calibration too (the
/// receiver reports its decode speeds from it).
fn calibration() -> Calibration {
    let speed = |level, ratio, e: f64, d: f64| LevelSpeed {
        level,
        ratio,
        encode_rate: e * 1e6,
        decode_rate: d * 1e6,
        setup: 0.0,
    };
    let c = Calibration {
        key: "test".into(),
        levels: vec![
            speed(Level::Raw, 1.0, 5000.0, 8000.0),
            speed(Level::Q8, 0.51, 600.0, 700.0),
            speed(Level::CgHigh, 0.20, 200.0, 300.0),
            speed(Level::CgDefault, 0.15, 200.0, 300.0),
            speed(Level::CgLow, 0.12, 200.0, 300.0),
        ],
        cores: 2,
    };
    let _ = c.clone().install();
    c
}

fn auto(floor: Option<Level>, pace: Option<u64>, deadline: Option<Duration>) -> SendOptions {
    let mut e = EncodeOptions::level(Level::Raw);
    e.chunk_tokens = 64;
    SendOptions {
        timeout: Duration::from_secs(10),
        policy: Some(PolicyOptions {
            floor,
            deadline,
            calibration: Some(calibration()),
            ..PolicyOptions::default()
        }),
        pace,
        ..SendOptions::new(e)
    }
}

/// One transfer over loopback; the received cache and the sender's policy summary.
fn transfer(fabric: FabricKind, kv: &KvCache, o: &SendOptions) -> (KvCache, PolicySummary) {
    let cfg = config(fabric);
    let er = Endpoint::new(cfg.clone()).unwrap();
    let es = Endpoint::new(cfg).unwrap();
    let slots = RecvSlots::register(&er, 16, 1 << 20).unwrap();
    let l = er.listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr();
    let t = std::thread::spawn(move || es.connect(addr).unwrap());
    let rx = l.accept(Duration::from_secs(5)).unwrap();
    let tx = t.join().unwrap();
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_kv(&tx, &kv.view(), o));
        let ro = RecvOptions {
            timeout: Duration::from_secs(10),
            ..RecvOptions::default()
        };
        let got = KvReceiver::accept(&rx, &slots, &ro).and_then(KvReceiver::recv_all);
        let sent = sender.join().unwrap();
        match (got, sent) {
            (Ok((g, rs)), Ok(st)) => {
                assert_eq!(st.blocks, rs.blocks);
                (g, st.policy.expect("a policy transfer has a summary"))
            }
            (g, s) => panic!("receiver: {:?}\nsender: {:?}", g.err(), s.err()),
        }
    })
}

fn count(s: &PolicySummary, l: Level) -> u32 {
    s.blocks_per_level[usize::from(l.code())]
}

#[test]
fn a_raw_floor_arrives_bit_exact_over_both_fabrics() {
    let kv = fixture_head(6);
    for fabric in FABRICS {
        let (got, s) = transfer(fabric, &kv, &auto(Some(Level::Raw), Some(20_000_000), None));
        assert_eq!(count(&s, Level::Raw), 6 * 4, "{fabric:?}: {}", s.counts());
        assert!(
            got.bytes() == kv.bytes(),
            "{fabric:?}: raw must be bit-exact"
        );
    }
}

/// The probe's writes are the cache's first blocks (at `q8`, the smaller level that costs one
/// pass over the data), not filler: they count among the transfer's blocks and decode like
/// the rest.
#[test]
fn the_probe_sends_the_first_blocks_of_the_cache() {
    let kv = fixture_head(30);
    for fabric in FABRICS {
        let (got, s) = transfer(fabric, &kv, &auto(None, Some(50_000_000), None));
        assert!(s.probed && s.probe_blocks > 0, "{fabric:?}: {s:?}");
        assert!(count(&s, Level::Q8) >= s.probe_blocks, "{fabric:?}: {s:?}");
        assert_eq!(s.blocks_per_level.iter().sum::<u32>(), 30 * 4, "{s:?}");
        check_within_bound(&kv.view(), &got, &EncodeOptions::level(Level::CgLow)).unwrap();
    }
}

#[test]
fn a_slow_paced_link_gets_compressed_blocks_within_their_bounds() {
    let kv = fixture_head(8);
    for fabric in FABRICS {
        // 1 MB/s: the wire is the bottleneck at every level, even with a debug build's encoder
        // sharing the cores with a parallel test (at 2 MB/s, cg-low's 0.12 bytes per input
        // byte asked for 17 MB/s of encoding, which a loaded debug build sometimes missed).
        let (got, s) = transfer(fabric, &kv, &auto(None, Some(1_000_000), None));
        let compressed =
            count(&s, Level::CgHigh) + count(&s, Level::CgDefault) + count(&s, Level::CgLow);
        assert!(compressed * 10 >= 32 * 8, "{fabric:?}: {}", s.counts());
        // The estimator saw the paced rate, not loopback's (far faster).
        assert!(s.last_rate < 3_000_000, "{fabric:?}: {} B/s", s.last_rate);
        // Each block is within its own level's bound, so within cg-low's, the loosest.
        check_within_bound(&kv.view(), &got, &EncodeOptions::level(Level::CgLow)).unwrap();
    }
}

#[test]
fn a_floor_is_never_crossed() {
    let kv = fixture_head(4);
    let (got, s) = transfer(
        FabricKind::Tcp,
        &kv,
        &auto(Some(Level::Q8), Some(5_000_000), None),
    );
    assert_eq!(
        count(&s, Level::Raw) + count(&s, Level::Q8),
        16,
        "{}",
        s.counts()
    );
    assert!(count(&s, Level::Q8) > 0, "{}", s.counts());
    check_within_bound(&kv.view(), &got, &EncodeOptions::level(Level::Q8)).unwrap();
}

#[test]
fn a_deadline_takes_the_best_quality_that_meets_it() {
    let kv = fixture_head(4);
    let pace = Some(20_000_000);
    // 16 blocks of ~49 KB raw at 20 MB/s: ~40 ms. A minute allows raw throughout.
    let (_, s) = transfer(
        FabricKind::Tcp,
        &kv,
        &auto(None, pace, Some(Duration::from_secs(60))),
    );
    assert_eq!(count(&s, Level::Raw), 16, "{}", s.counts());
    // A millisecond allows nothing: the fastest level, compressed at 2 MB/s (where even a
    // debug build's encoder outruns the wire).
    let pace = Some(2_000_000);
    let (_, s) = transfer(
        FabricKind::Tcp,
        &kv,
        &auto(None, pace, Some(Duration::from_millis(1))),
    );
    assert_eq!(count(&s, Level::Raw), 0, "{}", s.counts());
}

/// The fixture stacked `n` times along the layer axis (layers are the outermost dimension in
/// every layout, so the bytes simply repeat).
fn stacked(n: usize) -> KvCache {
    let f = fixture();
    let mut spec = *f.spec();
    spec.shape.layers *= n;
    KvCache::from_bytes(spec, f.bytes().repeat(n)).unwrap()
}

const ORDER: [&str; 5] = ["raw", "q8", "cg-high", "cg-default", "cg-low"];

#[test]
fn a_rate_lowered_mid_transfer_switches_later_blocks_to_a_smaller_level() {
    let Some(link) = ShapedLink::up(
        "a_rate_lowered_mid_transfer_switches_later_blocks_to_a_smaller_level",
        "2gbit",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let kv = stacked(4);
    kvwire_codec::file::save(&input, &kv, &Default::default()).unwrap();
    let out = dir.path().join("out.safetensors");
    let cache = dir.path().join("cache");
    let exec = |side: &str, args: &[&str]| {
        let mut c = link.exec(side, kvwire_bin());
        c.args(args)
            .env("XDG_CACHE_HOME", &cache)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let addr = "192.0.2.2:47350";
    let recv = exec(
        "b",
        &[
            "recv",
            "--calibrate",
            "--listen",
            addr,
            "-o",
            out.to_str().unwrap(),
            "--timeout",
            "60",
        ],
    )
    .spawn()
    .unwrap();
    // The receiver calibrates first (and caches it for the sender: same binary, same CPU).
    let t = Instant::now();
    while !cache.join("kvwire/calibration-v1").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the receiver never calibrated"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Layers 10 ms apart, as a prefill engine produces them: the transfer lasts over a second.
    let send_args = [
        "send",
        "--connect",
        addr,
        input.to_str().unwrap(),
        "--level",
        "auto",
        "--layer-interval-ms",
        "10",
        "--timeout",
        "60",
        "--json",
    ];
    let send = loop {
        let child = exec("a", &send_args).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        link.set_rate("20mbit");
        let o = child.wait_with_output().unwrap();
        let refused = String::from_utf8_lossy(&o.stderr).contains("refused");
        if o.status.success() || !refused || t.elapsed() > Duration::from_secs(60) {
            break o;
        }
        link.set_rate("2gbit");
    };
    let ro = recv.wait_with_output().unwrap();
    assert!(
        send.status.success(),
        "send: {}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(
        ro.status.success(),
        "recv: {}",
        String::from_utf8_lossy(&ro.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&send.stdout).unwrap();
    // The sender's CPU time over the transfer: encoding and its transport threads at least.
    assert!(j["cpu_s"].as_f64().unwrap() > 0.0, "{j}");
    let p = &j["policy"];
    let rank = |k: &str| {
        ORDER
            .iter()
            .position(|l| *l == p[k].as_str().unwrap())
            .unwrap()
    };
    eprintln!("{p}");
    assert!(rank("last_level") > rank("first_level"), "{p}");
    assert!(p["switches"].as_u64().unwrap() >= 1, "{p}");
    let (first, last) = (
        p["first_link_gbps"].as_f64().unwrap(),
        p["last_link_gbps"].as_f64().unwrap(),
    );
    assert!(last < first / 5.0 && last < 0.05, "{p}");
    let got = kvwire_codec::file::load(&out).unwrap().cache;
    check_within_bound(&kv.view(), &got, &EncodeOptions::level(Level::CgLow)).unwrap();
}

/// A connection keeps what a transfer measured of its link ([`LinkEstimate`]): the next
/// policy transfer on it starts from that instead of probing, unless told to probe; a
/// transfer too short for its windows to confirm a rate leaves nothing.
#[test]
fn a_connection_keeps_its_link_estimate_for_the_next_transfer() {
    let cfg = config(FabricKind::Tcp);
    let er = Endpoint::new(cfg.clone()).unwrap();
    let es = Endpoint::new(cfg).unwrap();
    let slots = RecvSlots::register(&er, 16, 1 << 20).unwrap();
    let l = er.listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr();
    let connect = || {
        let es = es.clone();
        let t = std::thread::spawn(move || es.connect(addr).unwrap());
        let rx = l.accept(Duration::from_secs(5)).unwrap();
        (t.join().unwrap(), rx)
    };
    let send = |tx: &kvwire_transport::Connection,
                rx: &kvwire_transport::Connection,
                kv: &KvCache,
                o: &SendOptions| {
        std::thread::scope(|s| {
            let sender = s.spawn(|| send_kv(tx, &kv.view(), o));
            let ro = RecvOptions {
                timeout: Duration::from_secs(10),
                ..RecvOptions::default()
            };
            KvReceiver::accept_whole(rx, &slots, &ro)
                .and_then(KvReceiver::recv_all)
                .unwrap();
            sender.join().unwrap().unwrap()
        })
    };
    let (tx, rx) = connect();
    assert_eq!(tx.link_estimate(), None, "a new connection knows nothing");
    // 1.2 MB paced at 20 MB/s: about 60 ms of windows on a backlogged link.
    let kv = fixture_head(6);
    let pace = 20_000_000;
    let mut fixed = auto(None, Some(pace), None);
    fixed.policy = None;
    send(&tx, &rx, &kv, &fixed);
    let e = tx.link_estimate().expect("a confirmed estimate is kept");
    // Within 0.5-3x of the pace, not to the percent: this asks whether the connection kept
    // its link's estimate (unpaced loopback reads GB/s), not how precise windows are. On a
    // loaded 2-core machine a completion handled a few ms late moves the next blocks' bytes
    // into a window without their time: the kept estimate read 30 MB/s in the CI run of
    // 2bd1683, and 20-33 MB/s in 15 runs here beside four busy loops.
    assert!(
        (10e6..60e6).contains(&e.rate),
        "kept {} B/s for a 20 MB/s link",
        e.rate
    );
    // The next policy transfer starts from it, without a probe.
    let s = send(&tx, &rx, &kv, &auto(None, Some(pace), None))
        .policy
        .unwrap();
    assert!(!s.probed, "{s:?}");
    assert_eq!(s.first_rate, e.rate as u64);
    // Told to, it probes all the same.
    let mut probing = auto(None, Some(pace), None);
    probing.policy.as_mut().unwrap().always_probe = true;
    assert!(send(&tx, &rx, &kv, &probing).policy.unwrap().probed);
    // Another connection starts from nothing; a transfer of one small layer, which never
    // backlogs the link, confirms no rate and leaves nothing either.
    let (tx2, rx2) = connect();
    let mut small = auto(None, None, None);
    small.policy = None;
    send(&tx2, &rx2, &fixture_head(1), &small);
    assert_eq!(tx2.link_estimate(), None);
    assert!(
        send(&tx2, &rx2, &kv, &auto(None, Some(pace), None))
            .policy
            .unwrap()
            .probed
    );
}
