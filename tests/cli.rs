//! The `kvwire` command line (package `kvwire-bench`), run as a subprocess: encode/decode
//! round trips on the fixture, `codec eval --json`, and clean one-line errors on bad input.
//!
//! The binary is built on demand by `kvwire_tests::kvwire_bin` (see there why).

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output};

use kvwire_codec::{file, DType, EncodeOptions, Layout, Level};
use kvwire_tests::{check_within_bound, convert, fixture, fixture_path, free_port, kvwire_bin};

/// Command-line arguments from strings and paths.
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(OsString::from($a)),*] };
}

fn kvwire(args: Vec<OsString>) -> Output {
    Command::new(kvwire_bin())
        .args(args)
        .output()
        .expect("running kvwire")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A successful run: status 0, nothing on stderr.
#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// A failed run: non-zero status, exactly one line on stderr starting `kvwire: error:`, no
/// panic anywhere. Returns that line.
#[track_caller]
fn assert_clean_error(out: &Output, what: &str) -> String {
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{what}: succeeded\n{o}\n{e}");
    assert_ne!(out.status.code(), None, "{what}: killed by a signal\n{e}");
    assert!(
        !o.contains("panicked") && !e.contains("panicked"),
        "{what}: panicked\n{e}"
    );
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: stderr is not one line:\n{e}");
    assert!(
        lines[0].starts_with("kvwire: error:"),
        "{what}: stderr {:?}",
        lines[0]
    );
    lines[0].to_string()
}

fn encode_args(input: &Path, level: &str, output: &Path) -> Vec<OsString> {
    args!["codec", "encode", input, "--level", level, "-o", output]
}

#[test]
fn cli_raw_round_trip_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let kvw = dir.path().join("fixture.kvw");
    let back = dir.path().join("back.safetensors");
    let fx = fixture_path();
    let out = kvwire(encode_args(&fx, "raw", &kvw));
    assert_ok(&out, "encode raw");
    assert!(!out.stdout.is_empty());
    let out = kvwire(args!["codec", "decode", &kvw, "-o", &back]);
    assert_ok(&out, "decode raw");
    let read = file::load(&back).unwrap();
    assert_eq!(read.cache.spec(), fixture().spec());
    assert!(
        read.cache.bytes() == fixture().bytes(),
        "tensor data differs"
    );
    // The .kvw is what the library writes.
    let lib = kvwire_codec::encode(&fixture().view(), &EncodeOptions::level(Level::Raw)).unwrap();
    assert!(std::fs::read(&kvw).unwrap() == lib);
}

/// Lossy levels through the CLI, on an f32 vLLM-layout file: within bound, layout and dtype
/// kept; options (`--chunk-tokens`, `--channel-scale-k`) reach the encoder.
#[test]
fn cli_lossy_round_trip_keeps_layout_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("vllm-f32.safetensors");
    let mut s = *fixture().spec();
    s.shape.layers = 3;
    let head =
        kvwire_codec::KvCache::from_bytes(s, fixture().bytes()[..s.byte_len()].to_vec()).unwrap();
    let kv = convert(&head, DType::F32).view().to_layout(Layout::Vllm);
    file::save(&input, &kv, &Default::default()).unwrap();
    for (level, extra) in [
        (Level::CgDefault, &[][..]),
        (
            Level::Q8,
            &["--chunk-tokens", "100", "--channel-scale-k"][..],
        ),
        (Level::Lmcache, &["--chunk-tokens", "64"][..]),
    ] {
        let kvw = dir.path().join(format!("{level}.kvw"));
        let back = dir.path().join(format!("{level}.safetensors"));
        let mut args = encode_args(&input, level.name(), &kvw);
        args.extend(extra.iter().map(OsString::from));
        assert_ok(&kvwire(args), &format!("encode {level}"));
        assert_ok(
            &kvwire(args!["codec", "decode", &kvw, "-o", &back]),
            &format!("decode {level}"),
        );
        let read = file::load(&back).unwrap().cache;
        let opts = EncodeOptions {
            level,
            chunk_tokens: extra.get(1).map_or(256, |c| c.parse().unwrap()),
            channel_scale_k: extra.contains(&"--channel-scale-k"),
        };
        check_within_bound(&kv.view(), &read, &opts).unwrap();
        let lib = kvwire_codec::encode(&kv.view(), &opts).unwrap();
        assert!(
            std::fs::read(&kvw).unwrap() == lib,
            "{level}: CLI and library differ"
        );
    }
}

#[test]
fn cli_eval_json_reports_every_level() {
    let fx = fixture_path();
    let out = kvwire(args![
        "codec", "eval", &fx, "--level", "all", "--json", "--reps", "1"
    ]);
    assert_ok(&out, "eval");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    let fields = [
        "level",
        "bytes_per_token",
        "ratio_vs_fp16",
        "ratio_vs_q8",
        "encode_gbps",
        "decode_gbps",
        "max_abs_error",
        "rmse",
        "snr_db",
    ];
    for (line, level) in lines.iter().zip(Level::ALL) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for f in fields {
            assert!(v.get(f).is_some(), "{level}: no field {f} in {line}");
        }
        assert_eq!(v["level"], level.name(), "{line}");
        let num = |f: &str| {
            v[f].as_f64()
                .unwrap_or_else(|| panic!("{level}: {f} is not a number: {line}"))
        };
        for f in ["bytes_per_token", "ratio_vs_fp16", "ratio_vs_q8", "rmse"] {
            assert!(
                num(f).is_finite() && num(f) > 0.0 || f == "rmse",
                "{level} {f}: {line}"
            );
        }
        assert!(
            num("encode_gbps") > 0.0 && num("decode_gbps") > 0.0,
            "{line}"
        );
        let err = num("max_abs_error");
        match level {
            Level::Raw => {
                assert_eq!(err, 0.0, "{line}");
                assert_eq!(num("rmse"), 0.0, "{line}");
                // A perfect SNR is infinite, which JSON spells null.
                assert!(
                    v["snr_db"].is_null() || num("snr_db").is_infinite(),
                    "{line}"
                );
                let r = num("ratio_vs_fp16");
                assert!(r > 0.99 && r <= 1.0, "{line}");
            }
            _ => {
                assert!(err > 0.0 && err.is_finite(), "{line}");
                assert!(num("rmse") > 0.0 && num("rmse") < err, "{line}");
                assert!(num("snr_db") > 10.0, "{line}");
            }
        }
        if level == Level::Q8 {
            assert_eq!(num("ratio_vs_q8"), 1.0, "{line}");
        }
        if level == Level::CgDefault {
            assert!(num("ratio_vs_q8") >= 2.5, "{line}");
        }
    }
}

#[test]
fn cli_bad_inputs_fail_with_one_clean_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let missing = p("missing.safetensors");
    let notst = p("not.safetensors");
    std::fs::write(&notst, b"this is not a safetensors file\n").unwrap();
    let empty = p("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    // A safetensors file whose tensor has the wrong name.
    let wrong = p("wrong.safetensors");
    {
        let data = vec![0u8; 2 * 2 * 4];
        let tv = safetensors_view(&data);
        std::fs::write(&wrong, tv).unwrap();
    }
    let good = p("good.kvw");
    let kv = fixture();
    let bytes = kvwire_codec::encode(&kv.view(), &EncodeOptions::level(Level::CgLow)).unwrap();
    std::fs::write(&good, &bytes).unwrap();
    let flipped = p("flipped.kvw");
    let mut b = bytes.clone();
    let mid = b.len() / 2;
    b[mid] ^= 4;
    std::fs::write(&flipped, &b).unwrap();
    let truncated = p("truncated.kvw");
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let fx = fixture_path();
    let out_st = p("out.safetensors");
    let out_kvw = p("out.kvw");

    let cases: Vec<(&str, Vec<OsString>)> = vec![
        ("encode missing file", encode_args(&missing, "q8", &out_kvw)),
        (
            "encode non-safetensors",
            encode_args(&notst, "q8", &out_kvw),
        ),
        ("encode empty file", encode_args(&empty, "q8", &out_kvw)),
        ("encode wrong tensor", encode_args(&wrong, "q8", &out_kvw)),
        (
            "encode raw with channel scale",
            args![
                "codec",
                "encode",
                &fx,
                "-l",
                "raw",
                "--channel-scale-k",
                "-o",
                &out_kvw
            ],
        ),
        (
            "encode chunk 0",
            args![
                "codec",
                "encode",
                &fx,
                "--chunk-tokens",
                "0",
                "-o",
                &out_kvw
            ],
        ),
        (
            "decode missing file",
            args!["codec", "decode", &missing, "-o", &out_st],
        ),
        (
            "decode non-kvw",
            args!["codec", "decode", &notst, "-o", &out_st],
        ),
        (
            "decode bit flip",
            args!["codec", "decode", &flipped, "-o", &out_st],
        ),
        (
            "decode truncated",
            args!["codec", "decode", &truncated, "-o", &out_st],
        ),
        (
            "decode a safetensors",
            args!["codec", "decode", &fx, "-o", &out_st],
        ),
        (
            "eval missing file",
            args!["codec", "eval", &missing, "--reps", "1"],
        ),
        (
            "eval non-safetensors",
            args!["codec", "eval", &notst, "--reps", "1"],
        ),
        ("eval a kvw", args!["codec", "eval", &good, "--reps", "1"]),
        (
            "eval unknown level",
            args!["codec", "eval", &fx, "--level", "bogus", "--reps", "1"],
        ),
        (
            "eval unknown level in a list",
            args![
                "codec",
                "eval",
                &fx,
                "--level",
                "q8,cg-medium",
                "--reps",
                "1"
            ],
        ),
        (
            "eval zero threads",
            args![
                "codec",
                "eval",
                &fx,
                "--level",
                "q8",
                "--threads",
                "0",
                "--reps",
                "1"
            ],
        ),
    ];
    for (what, args) in cases {
        let line = assert_clean_error(&kvwire(args), what);
        println!("{what}: {line}");
    }
    for o in [&out_st, &out_kvw] {
        assert!(!o.exists(), "{} written by a failed command", o.display());
    }
}

/// Invalid arguments that clap rejects (an unknown `--level` of `encode`, an unknown
/// subcommand) fail with a non-zero status and no panic. (They are clap's multi-line usage
/// errors, not `kvwire: error:` lines: see `cli_clap_errors_are_one_clean_line`.)
#[test]
fn cli_bad_arguments_fail_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out_kvw = dir.path().join("out.kvw");
    let fx = fixture_path();
    for args in [
        encode_args(&fx, "bogus", &out_kvw),
        args!["codec", "frobnicate"],
        args!["codec", "encode", &fx],
    ] {
        let out = kvwire(args);
        let e = text(&out.stderr);
        assert!(!out.status.success(), "{e}");
        assert_ne!(out.status.code(), None, "killed by a signal: {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!e.is_empty());
    }
    assert!(!out_kvw.exists());
}

/// Argument errors that clap's value parser catches (`codec encode -l bogus`) are also one
/// `kvwire: error:` line: `main` renders clap's error to its first line.
#[test]
fn cli_clap_errors_are_one_clean_line() {
    let dir = tempfile::tempdir().unwrap();
    let out_kvw = dir.path().join("out.kvw");
    let fx = fixture_path();
    assert_clean_error(
        &kvwire(encode_args(&fx, "bogus", &out_kvw)),
        "encode -l bogus",
    );
}

/// A minimal safetensors file holding one F16 tensor named `x` (not `kv`).
fn safetensors_view(data: &[u8]) -> Vec<u8> {
    let header = format!(
        r#"{{"x":{{"dtype":"F16","shape":[2,4],"data_offsets":[0,{}]}}}}"#,
        data.len()
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn cli_verbs_without_rdma_fails_with_a_clear_message() {
    if Path::new("/sys/class/infiniband").exists() {
        println!("SKIPPED cli_verbs_without_rdma_fails_with_a_clear_message: this host has RDMA");
        return;
    }
    let fx = fixture_path();
    let recv: Vec<OsString> = [
        "recv",
        "--listen",
        "127.0.0.1:0",
        "-o",
        "/nonexistent/x.safetensors",
    ]
    .map(OsString::from)
    .to_vec();
    let mut send: Vec<OsString> = ["send", "--connect", "127.0.0.1:9", "--level", "raw"]
        .map(OsString::from)
        .to_vec();
    send.push(fx.into());
    for mut args in [recv, send] {
        args.extend(["--fabric", "verbs"].map(OsString::from));
        let what = format!("{:?} --fabric verbs without RDMA", args[0]);
        let msg = assert_clean_error(&kvwire(args), &what);
        assert!(msg.contains("no RDMA support here"), "{what}: {msg}");
    }
}

/// In the soft-RoCE guest (`tests/softroce/run-tests`): a receiver process killed with
/// SIGKILL in the middle of a verbs transfer makes the sender process fail, not hang.
#[test]
fn cli_verbs_receiver_killed_mid_transfer_fails_the_sender() {
    if std::env::var_os("KVWIRE_SOFTROCE").is_none() {
        println!(
            "SKIPPED cli_verbs_receiver_killed_mid_transfer_fails_the_sender: needs soft-RoCE"
        );
        return;
    }
    use std::time::{Duration, Instant};
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let out = std::env::temp_dir().join(format!("kvwire-killed-{port}.safetensors"));
    let mut rx = Command::new(kvwire_bin())
        .args([
            "recv",
            "--fabric",
            "verbs",
            "--listen",
            &addr,
            "--timeout",
            "10",
            "-o",
        ])
        .arg(&out)
        .spawn()
        .expect("starting kvwire recv");
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let tx = Command::new(kvwire_bin())
        .args([
            "send",
            "--fabric",
            "verbs",
            "--connect",
            &addr,
            "--level",
            "raw",
        ])
        .args(["--layer-interval-ms", "300", "--timeout", "10"])
        .arg(fixture_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting kvwire send");
    std::thread::sleep(Duration::from_millis(2500));
    rx.kill().expect("killing the receiver");
    let _ = rx.wait();
    let sent = tx.wait_with_output().expect("the sender's status");
    let msg = assert_clean_error(&sent, "send after the receiver was killed");
    println!("sender: {msg} after {:?}", t0.elapsed());
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the sender took too long"
    );
    assert!(!out.exists(), "a killed receiver wrote no file");
}

/// `--fabric auto` without RDMA: each side says so once and ships over TCP.
#[test]
fn cli_fabric_auto_falls_back_to_tcp_and_says_so_once() {
    if Path::new("/sys/class/infiniband").exists() {
        println!("SKIPPED cli_fabric_auto_falls_back_to_tcp_and_says_so_once: this host has RDMA");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let rx = Command::new(kvwire_bin())
        .args([
            "recv",
            "--fabric",
            "auto",
            "--listen",
            &addr,
            "--accept-timeout",
            "30",
            "-o",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut send: Vec<OsString> = [
        "send",
        "--fabric",
        "auto",
        "--connect",
        &addr,
        "--level",
        "raw",
    ]
    .map(OsString::from)
    .to_vec();
    send.push(fixture_path().into());
    let tx = kvwire(send);
    let rx = rx.wait_with_output().unwrap();
    for (o, who) in [(&tx, "send"), (&rx, "recv")] {
        assert!(o.status.success(), "{who}: {}", text(&o.stderr));
        let e = text(&o.stderr);
        assert_eq!(e.matches("using tcp").count(), 1, "{who}: {e}");
        assert!(e.contains("no RDMA support here"), "{who}: {e}");
    }
    let (got, want) = (
        file::load(&out).unwrap(),
        file::load(fixture_path()).unwrap(),
    );
    assert!(
        got.cache == want.cache,
        "raw over the fallback must be bit-exact"
    );
}

/// `recv --transfers 3`: one receiver takes three senders in turn, each into the memory of the
/// last cache, and writes each to its own file.
#[test]
fn cli_recv_takes_several_transfers_into_reused_memory() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let rx = Command::new(kvwire_bin())
        .args(["recv", "--listen", &addr, "--transfers", "3", "--json"])
        .args(["--accept-timeout", "30", "-o"])
        .arg(dir.path().join("out-{n}.safetensors"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut rx = Some(rx);
    for level in ["raw", "cg-default", "raw"] {
        let mut send: Vec<OsString> = ["send", "--connect", &addr, "--level", level]
            .map(OsString::from)
            .to_vec();
        send.push(fixture_path().into());
        let out = kvwire(send);
        if !out.status.success() {
            let r = rx.take().unwrap();
            let _ = Command::new("kill").arg(r.id().to_string()).status();
            let r = r.wait_with_output().unwrap();
            panic!(
                "send {level}: {}\nreceiver: {}",
                text(&out.stderr),
                text(&r.stderr)
            );
        }
        assert_ok(&out, level);
    }
    let rx = rx.take().unwrap().wait_with_output().unwrap();
    assert_ok(&rx, "recv --transfers 3");
    let lines: Vec<serde_json::Value> = text(&rx.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one JSON line per transfer");
    for (i, (l, level)) in lines.iter().zip(["raw", "cg-default", "raw"]).enumerate() {
        assert_eq!(l["transfer"], i + 1);
        assert_eq!(l["level"], level);
        assert_eq!(l["memory_reused"], i > 0, "transfer {}", i + 1);
    }
    let want = file::load(fixture_path()).unwrap();
    for n in [1, 3] {
        let got = file::load(dir.path().join(format!("out-{n}.safetensors"))).unwrap();
        assert!(got.cache == want.cache, "raw transfer {n} is bit-exact");
    }
    let lossy = file::load(dir.path().join("out-2.safetensors")).unwrap();
    assert_eq!(lossy.cache.spec(), want.cache.spec());
    assert!(lossy.cache != want.cache, "cg-default is lossy");
}
