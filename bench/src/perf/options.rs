//! `kvwire perf` options: the command line (perftest's names where they mean the same) and
//! the subset both sides exchange and must agree on.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use kvwire_codec::Level;
use serde::{Deserialize, Serialize};

/// perftest's default port.
pub(crate) const DEFAULT_PORT: u16 = 18515;
/// Largest message of `-a` (8 MiB), and the largest `-s` accepted.
pub(crate) const MAX_SIZE: u64 = 8 << 20;

/// Which test to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub(crate) enum TestKind {
    /// One-sided writes, bandwidth.
    #[value(name = "write_bw")]
    #[serde(rename = "write_bw")]
    WriteBw,
    /// One-sided reads, bandwidth.
    #[value(name = "read_bw")]
    #[serde(rename = "read_bw")]
    ReadBw,
    /// Write ping-pong, latency.
    #[value(name = "write_lat")]
    #[serde(rename = "write_lat")]
    WriteLat,
    /// Whole KV caches through the session API, per level.
    #[value(name = "kv")]
    #[serde(rename = "kv")]
    Kv,
}

impl TestKind {
    /// The name on the command line and in JSON.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::WriteBw => "write_bw",
            Self::ReadBw => "read_bw",
            Self::WriteLat => "write_lat",
            Self::Kv => "kv",
        }
    }

    /// perftest-style title line.
    pub(crate) const fn title(self) -> &'static str {
        match self {
            Self::WriteBw => "kvwire Write BW Test",
            Self::ReadBw => "kvwire Read BW Test",
            Self::WriteLat => "kvwire Write Latency Test",
            Self::Kv => "kvwire KV Transfer Test",
        }
    }
}

/// `--fabric`: a fabric, or `auto` (shm when the peer is on this host, else tcp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FabricChoice {
    /// TCP sockets.
    Tcp,
    /// Shared memory (both processes on this host).
    Shm,
    /// RDMA verbs (InfiniBand, RoCE): `-d` device, `-x` GID index.
    Verbs,
    /// shm for a loopback peer, tcp otherwise.
    Auto,
}

/// `--level` of `perf kv`: levels in the order given; `None` is `auto` (the transport's
/// policy, choosing per block from the measured link rate and codec speeds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LevelSpec(Vec<Option<Level>>);

impl LevelSpec {
    /// The names of the levels to run (`auto` for the policy), in order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|l| l.map_or_else(|| "auto".to_string(), |l| l.to_string()))
            .collect()
    }
}

/// Parses `--level`: `all` (every fixed level, then `auto`), or a comma-separated list of
/// level names and `auto`.
pub(crate) fn parse_level_spec(s: &str) -> std::result::Result<LevelSpec, String> {
    if s == "all" {
        let mut v: Vec<Option<Level>> = Level::ALL.iter().copied().map(Some).collect();
        v.push(None);
        return Ok(LevelSpec(v));
    }
    let mut v = Vec::new();
    for part in s.split(',') {
        let l = match part.trim() {
            "auto" => None,
            p => Some(
                p.parse::<Level>()
                    .map_err(|e| format!("{e} (or auto, all, or a comma-separated list)"))?,
            ),
        };
        if !v.contains(&l) {
            v.push(l);
        }
    }
    if v.is_empty() {
        return Err("no level given".into());
    }
    Ok(LevelSpec(v))
}

/// `kvwire perf`.
#[derive(Debug, Args)]
pub(crate) struct PerfArgs {
    /// Test: write_bw, read_bw, write_lat or kv.
    pub(crate) test: TestKind,
    /// Server to connect to; without it this process is the server.
    pub(crate) host: Option<String>,
    /// Message size in bytes (default 65536 for bandwidth, 2 for latency).
    #[arg(short = 's', long = "size")]
    pub(crate) size: Option<u64>,
    /// Iterations per message size (default 5000 for bandwidth, 1000 for latency; at least 5).
    #[arg(short = 'n', long = "iters")]
    pub(crate) iters: Option<u64>,
    /// Every size from 2 bytes to 8 MiB (powers of two).
    #[arg(short = 'a', long = "all")]
    pub(crate) all: bool,
    /// Run each size for this many seconds instead of -n iterations.
    #[arg(short = 'D', long = "duration")]
    pub(crate) duration: Option<f64>,
    /// Connections (QPs): data streams of the TCP connection.
    #[arg(short = 'q', long = "qp", default_value_t = 1)]
    pub(crate) qps: u16,
    /// Writes or reads in flight (tx depth).
    #[arg(short = 't', long = "tx-depth", default_value_t = 128)]
    pub(crate) tx_depth: u32,
    /// Port of the server.
    #[arg(short = 'p', long = "port", default_value_t = DEFAULT_PORT)]
    pub(crate) port: u16,
    /// RDMA device for --fabric verbs (default: the first one).
    #[arg(short = 'd', long = "ib-dev")]
    pub(crate) device: Option<String>,
    /// GID index for --fabric verbs (default: the port's IPv4-mapped RoCE v2 GID).
    #[arg(short = 'x', long = "gid-index")]
    pub(crate) gid_index: Option<u32>,
    /// Report bandwidth in Gb/sec (10^9 bit) instead of MiB/sec.
    #[arg(long = "report_gbits", alias = "report-gbits")]
    pub(crate) report_gbits: bool,
    /// Accepted for perftest compatibility (no CPU-frequency warning is printed anyway).
    #[arg(short = 'F', long = "CPU-freq")]
    pub(crate) cpu_freq: bool,
    /// Print one JSON object (see docs/perf-schema.json) instead of the tables.
    #[arg(long = "out_json", alias = "json")]
    pub(crate) json: bool,
    /// Fabric: tcp, shm, verbs or auto (shm for a loopback peer, else tcp).
    #[arg(long, value_enum, default_value = "tcp")]
    pub(crate) fabric: FabricChoice,
    /// Measure a baseline on the same path first (iperf3 for tcp, memcpy for shm) and print
    /// the ratio.
    #[arg(long = "compare-baseline")]
    pub(crate) compare_baseline: bool,
    /// Draw bandwidth vs message size (or kv goodput per level) into this SVG file.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// kv: ship this KV file (.safetensors) instead of a synthetic cache (client only).
    #[arg(long)]
    pub(crate) input: Option<PathBuf>,
    /// kv: a synthetic cache of this model's shape (llama-3-8b, llama-3-70b, mistral-7b,
    /// qwen2.5-7b, smollm2-135m).
    #[arg(long)]
    pub(crate) synthetic: Option<String>,
    /// kv: tokens of the synthetic cache.
    #[arg(long, default_value_t = 1024)]
    pub(crate) tokens: usize,
    /// kv: a level, `auto`, a comma-separated list, or `all` (every level, then `auto`).
    #[arg(long, value_parser = parse_level_spec, default_value = "all")]
    pub(crate) level: LevelSpec,
    /// kv: seed of the synthetic cache.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Seconds the server waits for a client, and any single wait for the peer may take.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) timeout: f64,
}

/// What both sides must agree on, sent in the first message and compared field by field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Exchanged {
    /// Test name.
    pub(crate) test: TestKind,
    /// Fabric as given (`auto` is compared as given).
    pub(crate) fabric: FabricChoice,
    /// Message sizes.
    pub(crate) sizes: Vec<u64>,
    /// Iterations per size (ignored in duration mode).
    pub(crate) iters: u64,
    /// Seconds per size in duration mode.
    pub(crate) duration: Option<f64>,
    /// Data streams.
    pub(crate) qps: u16,
    /// In flight.
    pub(crate) tx_depth: u32,
    /// Units of the report.
    pub(crate) report_gbits: bool,
    /// Baseline run.
    pub(crate) compare_baseline: bool,
    /// kv: level names.
    pub(crate) levels: Vec<String>,
    /// kv: synthetic shape (None with --input).
    pub(crate) synthetic: Option<String>,
    /// kv: tokens.
    pub(crate) tokens: usize,
    /// kv: seed.
    pub(crate) seed: u64,
}

impl PerfArgs {
    /// Checks the arguments and builds the exchanged set.
    pub(crate) fn exchanged(&self) -> Result<Exchanged> {
        let lat = self.test == TestKind::WriteLat;
        let sizes = if self.all {
            if self.size.is_some() {
                bail!("-a/--all and -s/--size exclude each other");
            }
            (1..=23).map(|p| 1u64 << p).collect()
        } else {
            let s = self.size.unwrap_or(if lat { 2 } else { 65536 });
            if !(1..=MAX_SIZE).contains(&s) {
                bail!("-s/--size must be between 1 and {MAX_SIZE} bytes, not {s}");
            }
            vec![s]
        };
        let iters = self.iters.unwrap_or(if lat { 1000 } else { 5000 });
        if !(5..=100_000_000).contains(&iters) {
            bail!("-n/--iters must be between 5 and 100000000, not {iters}");
        }
        if let Some(d) = self.duration {
            if !(d.is_finite() && d > 0.0 && d <= 3600.0) {
                bail!("-D/--duration must be between 0 and 3600 seconds, not {d}");
            }
        }
        if !(1..=64).contains(&self.qps) {
            bail!("-q/--qp must be between 1 and 64, not {}", self.qps);
        }
        if !(1..=4096).contains(&self.tx_depth) {
            bail!(
                "-t/--tx-depth must be between 1 and 4096, not {}",
                self.tx_depth
            );
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= 3600.0) {
            bail!(
                "--timeout must be between 0 and 3600 seconds, not {}",
                self.timeout
            );
        }
        let kv = self.test == TestKind::Kv;
        if !kv && (self.input.is_some() || self.synthetic.is_some()) {
            bail!("--input and --synthetic are for `kvwire perf kv`");
        }
        if self.input.is_some() && self.synthetic.is_some() {
            bail!("--input and --synthetic exclude each other");
        }
        if kv && !(1..=1_000_000).contains(&self.tokens) {
            bail!(
                "--tokens must be between 1 and 1000000, not {}",
                self.tokens
            );
        }
        let synthetic = if kv && self.input.is_none() {
            let name = self
                .synthetic
                .clone()
                .unwrap_or_else(|| "llama-3-8b".into());
            crate::perf::synthetic::ModelShape::by_name(&name)?;
            Some(name)
        } else {
            None
        };
        Ok(Exchanged {
            test: self.test,
            fabric: self.fabric,
            sizes: if kv { Vec::new() } else { sizes },
            iters,
            duration: self.duration,
            qps: self.qps,
            tx_depth: self.tx_depth,
            report_gbits: self.report_gbits,
            compare_baseline: self.compare_baseline,
            levels: if kv { self.level.names() } else { Vec::new() },
            synthetic,
            tokens: if kv { self.tokens } else { 0 },
            seed: self.seed,
        })
    }
}

impl Exchanged {
    /// Every option that differs from the peer's, as "OPTION is X here, Y at the peer".
    pub(crate) fn mismatches(&self, peer: &Self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name} is {a} here, {b} at the peer"));
            }
        };
        cmp("test", self.test.name().into(), peer.test.name().into());
        cmp(
            "--fabric",
            format!("{:?}", self.fabric).to_lowercase(),
            format!("{:?}", peer.fabric).to_lowercase(),
        );
        cmp(
            "-s/--size (or -a)",
            sizes_text(&self.sizes),
            sizes_text(&peer.sizes),
        );
        cmp("-n/--iters", self.iters.to_string(), peer.iters.to_string());
        cmp(
            "-D/--duration",
            opt_text(self.duration),
            opt_text(peer.duration),
        );
        cmp("-q/--qp", self.qps.to_string(), peer.qps.to_string());
        cmp(
            "-t/--tx-depth",
            self.tx_depth.to_string(),
            peer.tx_depth.to_string(),
        );
        cmp(
            "--report_gbits",
            self.report_gbits.to_string(),
            peer.report_gbits.to_string(),
        );
        cmp(
            "--compare-baseline",
            self.compare_baseline.to_string(),
            peer.compare_baseline.to_string(),
        );
        cmp(
            "--level",
            levels_text(&self.levels),
            levels_text(&peer.levels),
        );
        cmp(
            "--synthetic/--input",
            self.synthetic.clone().unwrap_or_else(|| "(--input)".into()),
            peer.synthetic.clone().unwrap_or_else(|| "(--input)".into()),
        );
        cmp("--tokens", self.tokens.to_string(), peer.tokens.to_string());
        cmp("--seed", self.seed.to_string(), peer.seed.to_string());
        out
    }
}

fn sizes_text(s: &[u64]) -> String {
    match s {
        [] => "none".into(),
        [one] => one.to_string(),
        _ => format!("{}..{} ({} sizes)", s[0], s[s.len() - 1], s.len()),
    }
}

fn opt_text(d: Option<f64>) -> String {
    d.map_or_else(|| "off".into(), |d| d.to_string())
}

fn levels_text(l: &[String]) -> String {
    if l.is_empty() {
        return "none".into();
    }
    l.join(",")
}
