//! perftest-style output: the header block between dashed lines, the result tables, and the
//! `--json` twin (described by docs/perf-schema.json).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::options::{Exchanged, TestKind};

/// perftest's dashed line (87 dashes).
pub(crate) const DASHES: &str =
    "---------------------------------------------------------------------------------------";

/// What the header block shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Header {
    /// `server` or `client`.
    pub(crate) role: String,
    /// Fabric actually used (`tcp` or `shm`).
    pub(crate) fabric: String,
    /// `-d` as given (meaningful for verbs only).
    pub(crate) device: Option<String>,
    /// `-x` as given (meaningful for verbs only).
    pub(crate) gid_index: Option<u32>,
    /// `-q`: data streams.
    pub(crate) connections: u16,
    /// `-t`.
    pub(crate) tx_depth: u32,
    /// MTU of the interface carrying the data, in bytes (None for shm or when unknown).
    pub(crate) mtu: Option<u32>,
    /// `Ethernet`, `Loopback` or `Shared memory`.
    pub(crate) link_type: String,
    /// Our fabric addresses and the region the peer targets.
    pub(crate) local_address: String,
    /// The peer's.
    pub(crate) remote_address: String,
}

/// One bandwidth row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BwRow {
    /// Message size in bytes.
    #[serde(rename = "MsgSize")]
    pub(crate) size: u64,
    /// Messages completed.
    #[serde(rename = "n_iterations")]
    pub(crate) iterations: u64,
    /// Best bandwidth over groups of 100 completions, in the report's unit.
    #[serde(rename = "BW_peak")]
    pub(crate) peak: f64,
    /// Bandwidth from the first post to the last completion, in the report's unit.
    #[serde(rename = "BW_average")]
    pub(crate) average: f64,
    /// Millions of messages per second.
    #[serde(rename = "MsgRate")]
    pub(crate) msg_rate: f64,
    /// Seconds from the first post to the last completion.
    pub(crate) seconds: f64,
    /// The baseline measured just before, if asked for.
    pub(crate) baseline: Option<Baseline>,
}

/// A baseline beside a bandwidth row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Baseline {
    /// `iperf3` or `memcpy`.
    pub(crate) tool: String,
    /// Its bandwidth in the report's unit, or None when unavailable.
    #[serde(rename = "BW_average")]
    pub(crate) average: Option<f64>,
    /// kvwire's average / the baseline's.
    pub(crate) ratio: Option<f64>,
    /// Why it is missing, when it is.
    pub(crate) note: Option<String>,
}

/// One latency row (microseconds; one-way = round trip / 2, as perftest).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LatRow {
    /// Message size in bytes.
    #[serde(rename = "MsgSize")]
    pub(crate) size: u64,
    /// Round trips measured.
    #[serde(rename = "n_iterations")]
    pub(crate) iterations: u64,
    /// Fastest.
    pub(crate) t_min: f64,
    /// Slowest.
    pub(crate) t_max: f64,
    /// Median.
    pub(crate) t_typical: f64,
    /// Mean.
    pub(crate) t_avg: f64,
    /// Standard deviation.
    pub(crate) t_stdev: f64,
    /// 99th percentile.
    pub(crate) p99: f64,
    /// 99.9th percentile.
    pub(crate) p99_9: f64,
}

/// One KV-transfer row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KvRow {
    /// Level name.
    pub(crate) level: String,
    /// Bytes written to the peer (blocks plus header).
    pub(crate) wire_bytes: u64,
    /// fp16-equivalent bytes of the cache.
    pub(crate) fp16_bytes: u64,
    /// fp16 bytes / wire bytes.
    pub(crate) ratio: f64,
    /// Seconds from the start to the receiver's report that the last layer decoded.
    pub(crate) last_layer_decoded_s: f64,
    /// fp16 bytes delivered per second, in Gbit/s.
    pub(crate) goodput_gbps: f64,
    /// Goodput over `raw`'s in the same run (None when raw was not run).
    pub(crate) speedup_vs_raw: Option<f64>,
    /// For `auto`: blocks sent per level, e.g. `raw:12 q8:468` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) auto_blocks: Option<String>,
}

/// The unit of bandwidth columns.
pub(crate) const fn bw_unit(gbits: bool) -> &'static str {
    if gbits {
        "Gb/sec"
    } else {
        "MiB/sec"
    }
}

/// Bytes per second in the report's unit (perftest: 2^20 bytes, or 10^9 bits).
pub(crate) fn to_unit(bytes_per_s: f64, gbits: bool) -> f64 {
    if gbits {
        bytes_per_s * 8.0 / 1e9
    } else {
        bytes_per_s / f64::from(1u32 << 20)
    }
}

/// Prints the header block.
pub(crate) fn print_header(test: TestKind, h: &Header) {
    println!("{DASHES}");
    println!("                    {}", test.title());
    println!(
        " Fabric          : {:<12} Device         : {}",
        h.fabric,
        h.device.as_deref().unwrap_or("(none)")
    );
    println!(
        " Number of conns : {:<12} Transport type : {}",
        h.connections,
        match h.fabric.as_str() {
            "shm" => "SHM",
            "verbs" => "IB (RC QP; RoCE on Ethernet)",
            _ => "TCP",
        }
    );
    println!(
        " Role            : {:<12} TX depth       : {}",
        h.role, h.tx_depth
    );
    match h.mtu {
        Some(m) => println!(" Mtu             : {m}[B]"),
        None => println!(" Mtu             : n/a"),
    }
    println!(" Link type       : {}", h.link_type);
    if let Some(x) = h.gid_index {
        println!(" GID index       : {x} (verbs only)");
    }
    println!(" Data ex. method : Ethernet (kvwire control connection)");
    println!("{DASHES}");
    println!(" local address: {}", h.local_address);
    println!(" remote address: {}", h.remote_address);
    println!("{DASHES}");
}

/// Prints a bandwidth table.
pub(crate) fn print_bw(rows: &[BwRow], gbits: bool) {
    let u = bw_unit(gbits);
    println!(" #bytes     #iterations    BW peak[{u}]    BW average[{u}]   MsgRate[Mpps]");
    for r in rows {
        println!(
            " {:<7}    {:<10}       {:<7.2}            {:<7.2}\t\t     {:<7.6}",
            r.size, r.iterations, r.peak, r.average, r.msg_rate
        );
        if let Some(b) = &r.baseline {
            match (b.average, b.ratio) {
                (Some(avg), Some(ratio)) => println!(
                    " baseline: {} {:.2} {u}; kvwire / {} = {:.3}",
                    b.tool, avg, b.tool, ratio
                ),
                _ => println!(
                    " baseline: not available ({})",
                    b.note.as_deref().unwrap_or("unknown reason")
                ),
            }
        }
    }
    println!("{DASHES}");
}

/// Prints a latency table.
pub(crate) fn print_lat(rows: &[LatRow]) {
    println!(" #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]");
    for r in rows {
        println!(
            " {:<7} {:<10}   {:<7.2}        {:<7.2}      {:<7.2}          {:<7.2}        {:<7.2}         {:<7.2}                {:<7.2}",
            r.size, r.iterations, r.t_min, r.t_max, r.t_typical, r.t_avg, r.t_stdev, r.p99, r.p99_9
        );
    }
    println!("{DASHES}");
}

/// Prints a KV table.
pub(crate) fn print_kv(rows: &[KvRow]) {
    println!(" level        wire bytes      ratio   last layer decoded[ms]   goodput[Gb/sec]   speed-up vs raw");
    for r in rows {
        println!(
            " {:<12} {:<15} {:<7.2} {:<24.2} {:<17.3} {}{}",
            r.level,
            r.wire_bytes,
            r.ratio,
            r.last_layer_decoded_s * 1e3,
            r.goodput_gbps,
            r.speedup_vs_raw
                .map_or_else(|| "n/a".to_string(), |s| format!("{s:.2}x")),
            r.auto_blocks
                .as_ref()
                .map_or_else(String::new, |b| format!("   (blocks {b})"))
        );
    }
    println!("{DASHES}");
}

/// The `--json` document.
pub(crate) fn json_doc(
    test: TestKind,
    h: &Header,
    ex: &Exchanged,
    results: &Value,
    extra: Value,
) -> Value {
    let units = match test {
        TestKind::WriteBw | TestKind::ReadBw => bw_unit(ex.report_gbits),
        TestKind::WriteLat => "usec",
        TestKind::Kv => "Gb/sec",
    };
    json!({
        "kvwire_perf": 1,
        "test": test.name(),
        "role": h.role,
        "header": h,
        "options": ex,
        "units": units,
        "results": results,
        "source": extra,
    })
}
