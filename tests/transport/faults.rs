//! `kvwire send` / `kvwire recv` as real processes: a round trip through the CLI, peers
//! killed or frozen mid-transfer (the survivor errors within 5 s, never hangs), and the
//! CLI's one-line errors.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvwire_codec::{EncodeOptions, Level};
use kvwire_tests::{check_within_bound, fixture, fixture_path, kvwire_bin, layer_cache};
use kvwire_transport::session::{KvReceiver, KvSender, RecvOptions, RecvSlots, SendOptions};
use kvwire_transport::{Endpoint, FabricKind, TransportError};

use super::config;

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn spawn(args: &[&str]) -> Child {
    Command::new(kvwire_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kvwire")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits for `child`, failing the test if it runs past `limit` (it is killed then).
fn wait_limit(mut child: Child, limit: Duration) -> Output {
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "kvwire still running after {limit:?}; its stdout: {}\nits stderr: {}",
                text(&o.stdout),
                text(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `kvwire send` with `args` to the `kvwire recv` child `recv`, again while it is
/// refused and `recv` runs: on a loaded machine the receiver may not listen yet when the
/// sender starts, and would then wait out its accept timeout for nobody.
fn send_to(recv: &mut Child, args: &[&str]) -> Output {
    let t = Instant::now();
    loop {
        let o = wait_limit(spawn(args), Duration::from_secs(30));
        let refused = !o.status.success() && text(&o.stderr).contains("Connection refused");
        if !refused || t.elapsed() > Duration::from_secs(20) || recv.try_wait().unwrap().is_some() {
            return o;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Retries `connect` until the child's listener is up.
fn connect_retry(ep: &Endpoint, addr: &str) -> kvwire_transport::Connection {
    let t = Instant::now();
    loop {
        match ep.connect(addr) {
            Ok(c) => return c,
            Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("connecting: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn the_cli_ships_a_kv_file_over_both_fabrics() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture_path();
    for (fabric, level) in [
        ("tcp", "raw"),
        ("shm", "raw"),
        ("tcp", "cg-default"),
        ("shm", "cg-low"),
    ] {
        let addr = free_addr();
        let out = dir.path().join(format!("{fabric}-{level}.safetensors"));
        let mut recv = spawn(&[
            "recv",
            "--listen",
            &addr,
            "-o",
            out.to_str().unwrap(),
            "--fabric",
            fabric,
            "--token",
            "t0k",
        ]);
        std::thread::sleep(Duration::from_millis(200));
        let so = send_to(
            &mut recv,
            &[
                "send",
                "--connect",
                &addr,
                input.to_str().unwrap(),
                "--level",
                level,
                "--fabric",
                fabric,
                "--token",
                "t0k",
                "--chunk-tokens",
                "64",
            ],
        );
        let ro = wait_limit(recv, Duration::from_secs(30));
        // Both sides' words on either failure: one side's error is often the other's cause.
        assert!(
            so.status.success() && ro.status.success(),
            "{fabric} {level}: send ({}): {}\nrecv ({}): {}",
            so.status,
            text(&so.stderr),
            ro.status,
            text(&ro.stderr)
        );
        let line = text(&so.stdout);
        assert!(
            line.contains("bytes on the wire")
                && line.contains("decoded at the receiver")
                && line.contains("goodput"),
            "{line}"
        );
        assert_eq!(text(&ro.stdout).lines().count(), 1);
        let got = kvwire_codec::file::load(&out).unwrap().cache;
        let mut o = EncodeOptions::level(level.parse::<Level>().unwrap());
        o.chunk_tokens = 64;
        check_within_bound(&fixture().view(), &got, &o).unwrap();
    }
}

#[test]
fn a_wrong_token_fails_both_processes_with_one_line() {
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let mut recv = spawn(&[
        "recv",
        "--listen",
        &addr,
        "-o",
        out.to_str().unwrap(),
        "--token",
        "right",
    ]);
    std::thread::sleep(Duration::from_millis(200));
    let send = send_to(
        &mut recv,
        &[
            "send",
            "--connect",
            &addr,
            fixture_path().to_str().unwrap(),
            "--level",
            "raw",
            "--token",
            "wrong",
        ],
    );
    for (who, o) in [
        ("send", send),
        ("recv", wait_limit(recv, Duration::from_secs(15))),
    ] {
        assert_eq!(o.status.code(), Some(1), "{who}");
        let err = text(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{who}: {err}");
        assert!(
            err.starts_with("kvwire: error:") && err.contains("authentication failed"),
            "{who}: {err}"
        );
    }
    assert!(!out.exists());
}

#[test]
fn connecting_to_nobody_is_one_clear_line() {
    let o = wait_limit(
        spawn(&[
            "send",
            "--connect",
            &free_addr(),
            fixture_path().to_str().unwrap(),
            "--level",
            "raw",
        ]),
        Duration::from_secs(15),
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.lines().count() == 1 && err.contains("connecting to"),
        "{err}"
    );
}

/// Sends the fixture layer by layer (50 ms apart) to a `kvwire recv` child, which `hit`
/// kills or freezes after three layers; returns the sender's error and how long after the
/// hit it came.
fn sender_vs_receiver_hit(fabric: FabricKind, hit: &str) -> (TransportError, Duration) {
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let mut child = spawn(&[
        "recv",
        "--listen",
        &addr,
        "-o",
        out.to_str().unwrap(),
        "--fabric",
        fabric.name(),
        "--timeout",
        "30",
    ]);
    let ep = Endpoint::new(config(fabric)).unwrap();
    let conn = connect_retry(&ep, &addr);
    let kv = fixture();
    let mut o = SendOptions::new(EncodeOptions::level(Level::Raw));
    o.timeout = Duration::from_secs(3);
    let mut tx = KvSender::begin(&conn, *kv.spec(), &o).unwrap();
    let mut hit_at = None;
    let mut err = None;
    for layer in 0..kv.spec().shape.layers {
        if layer == 3 {
            let pid = child.id().to_string();
            if hit == "kill" {
                child.kill().unwrap();
            } else {
                Command::new("kill").args(["-STOP", &pid]).status().unwrap();
            }
            hit_at = Some(Instant::now());
        }
        if let Err(e) = tx.push_layer(layer, &layer_cache(kv, layer).view()) {
            err = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = match err {
        Some(e) => e,
        None => tx
            .finish()
            .expect_err("a transfer to a dead receiver cannot complete"),
    };
    let took = hit_at.unwrap().elapsed();
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (e, took)
}

#[test]
fn a_receiver_killed_mid_transfer_fails_the_sender_within_5_s() {
    for fabric in super::FABRICS {
        let (e, took) = sender_vs_receiver_hit(fabric, "kill");
        assert!(took < Duration::from_secs(5), "{fabric:?}: {took:?}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn a_frozen_receiver_fails_the_sender_after_its_timeout_not_never() {
    let (e, took) = sender_vs_receiver_hit(FabricKind::Tcp, "stop");
    // The timeout is 3 s; the 50 ms pauses between layers add a little.
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(e.to_string().contains("timed out"), "{e}");
}

#[test]
fn a_sender_killed_mid_transfer_fails_the_receiver_within_5_s() {
    for fabric in super::FABRICS {
        let ep = Endpoint::new(config(fabric)).unwrap();
        let slots = RecvSlots::register(&ep, 4, 1 << 20).unwrap();
        let l = ep.listen("127.0.0.1:0").unwrap();
        let addr = l.local_addr().to_string();
        let mut child = spawn(&[
            "send",
            "--connect",
            &addr,
            fixture_path().to_str().unwrap(),
            "--level",
            "raw",
            "--fabric",
            fabric.name(),
            "--layer-interval-ms",
            "200",
            "--timeout",
            "30",
        ]);
        let conn = l.accept(Duration::from_secs(10)).unwrap();
        let ro = RecvOptions {
            timeout: Duration::from_secs(3),
            ..RecvOptions::default()
        };
        let mut rx = KvReceiver::accept(&conn, &slots, &ro).unwrap();
        let (first, _) = rx.next_layer().unwrap().expect("layer 0");
        assert_eq!(first, 0);
        child.kill().unwrap();
        let t = Instant::now();
        let e = loop {
            match rx.next_layer() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("{fabric:?}: the transfer cannot complete without its sender"),
                Err(e) => break e,
            }
        };
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{fabric:?}: {:?}",
            t.elapsed()
        );
        assert!(
            matches!(e, TransportError::PeerClosed(_)),
            "{fabric:?}: {e}"
        );
        let _ = child.wait();
    }
}
