//! `--compare-baseline`: iperf3 on the same path for tcp (the server side runs
//! `iperf3 -s -1`, the client `iperf3 -c`), an in-process memcpy of the same message size
//! for shm.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

/// Whether `iperf3` can be run here.
pub(crate) fn iperf3_installed() -> bool {
    Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Server: `iperf3 -s -1 -p PORT`, serving one client.
pub(crate) fn iperf3_server(port: u16) -> Result<Child> {
    let child = Command::new("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // iperf3 binds within milliseconds; the client also retries its connect.
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

/// Waits for `child` at most `limit`, then kills it.
pub(crate) fn reap(mut child: Child, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Client: `iperf3 -c HOST -p PORT -l SIZE -P STREAMS -t SECS -J`; bytes per second received.
/// `streams` is kvwire's data stream count (`-q`), so both move data over as many sockets.
pub(crate) fn iperf3_client(
    host: &str,
    port: u16,
    size: u64,
    streams: u32,
    secs: u64,
) -> Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-l",
        &size.max(1).to_string(),
        "-P",
        &streams.max(1).to_string(),
        "-t",
        &secs.max(1).to_string(),
        "-J",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let child = cmd.spawn()?;
    let limit = Duration::from_secs(secs + 15);
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(o) => o?,
        Err(_) => anyhow::bail!("iperf3 -c ran past {limit:?}"),
    };
    let _ = handle.join();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("iperf3 printed no JSON ({e})"))?;
    if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
        anyhow::bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 8.0)
        .ok_or_else(|| anyhow::anyhow!("iperf3's JSON has no end.sum_received.bits_per_second"))
}

/// memcpy of `size`-byte messages (between two buffers of this process) for about
/// `budget`; bytes per second.
pub(crate) fn memcpy(size: u64, budget: Duration) -> f64 {
    let n = size as usize;
    let src = vec![0x5au8; n];
    let mut dst = vec![0u8; n];
    let start = Instant::now();
    let mut copies = 0u64;
    while copies < 8 || start.elapsed() < budget {
        for _ in 0..16 {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
        copies += 16;
    }
    (size * copies) as f64 / start.elapsed().as_secs_f64()
}
