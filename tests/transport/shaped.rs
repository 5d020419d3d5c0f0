//! A KV file over a real shaped link: two network namespaces joined by a 1 Gbit/s veth
//! (tests/netns/shaped-link.sh), `kvwire recv` in one, `kvwire send` in the other. Needs root;
//! skipped with a message where namespaces are unavailable.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvwire_codec::{EncodeOptions, Level};
use kvwire_tests::{check_within_bound, fixture, fixture_path, kvwire_bin, ShapedLink};

fn exec(link: &ShapedLink, side: &str, args: &[&str]) -> Command {
    let mut c = link.exec(side, kvwire_bin());
    c.args(args);
    c
}

#[test]
fn a_kv_file_crosses_a_1_gbit_shaped_link() {
    let Some(link) = ShapedLink::up("a_kv_file_crosses_a_1_gbit_shaped_link", "1gbit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (i, level) in ["raw", "cg-default"].into_iter().enumerate() {
        let out = dir.path().join(format!("{level}.safetensors"));
        let addr = format!("192.0.2.2:{}", 47300 + i);
        let recv = exec(
            &link,
            "b",
            &[
                "recv",
                "--listen",
                &addr,
                "-o",
                out.to_str().unwrap(),
                "--timeout",
                "20",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let t = Instant::now();
        let send = loop {
            let o = exec(
                &link,
                "a",
                &[
                    "send",
                    "--connect",
                    &addr,
                    fixture_path().to_str().unwrap(),
                    "--level",
                    level,
                ],
            )
            .output()
            .unwrap();
            let refused = String::from_utf8_lossy(&o.stderr).contains("refused");
            if o.status.success() || !refused || t.elapsed() > Duration::from_secs(10) {
                break o;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let ro = recv.wait_with_output().unwrap();
        assert!(
            send.status.success(),
            "send {level}: {}",
            String::from_utf8_lossy(&send.stderr)
        );
        assert!(
            ro.status.success(),
            "recv {level}: {}",
            String::from_utf8_lossy(&ro.stderr)
        );
        let got = kvwire_codec::file::load(&out).unwrap().cache;
        check_within_bound(
            &fixture().view(),
            &got,
            &EncodeOptions::level(level.parse::<Level>().unwrap()),
        )
        .unwrap();
    }
}
