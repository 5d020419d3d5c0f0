//! `kvwire send` / `kvwire recv`: ship one KV file between two processes over TCP or
//! shared memory, through the per-layer pipeline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kvwire_codec::{file, EncodeOptions, KvCache, KvView, Level};
use kvwire_transport::policy::{Calibration, PolicyOptions};
use kvwire_transport::session::{
    send_kv, KvReceiver, KvSender, RecvOptions, RecvSlots, SendOptions,
};
use kvwire_transport::{Connection, Endpoint, EndpointConfig, FabricKind};

/// Options both sides share.
#[derive(Debug, Args)]
pub(crate) struct LinkArgs {
    /// Pre-shared token; both sides must give the same one.
    #[arg(long)]
    token: Option<String>,
    /// Fabric: tcp, shm (both processes on this node), verbs (RDMA), or auto (verbs where an
    /// RDMA device opens, else tcp, saying so once; both sides must resolve alike).
    #[arg(long, default_value = "tcp")]
    fabric: FabricArg,
    /// Seconds any single wait may take (a silent or dead peer fails after this).
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// TCP data streams per connection.
    #[arg(long, default_value_t = 2)]
    streams: u16,
    /// Encoding (send) or decoding (recv) threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object instead of the summary line.
    #[arg(long)]
    json: bool,
}

/// `--fabric`: a fabric, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FabricArg {
    /// This fabric.
    Fixed(FabricKind),
    /// The best tier that works here: verbs, else tcp.
    Auto,
}

impl std::str::FromStr for FabricArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        s.parse::<FabricKind>()
            .map(Self::Fixed)
            .map_err(|_| format!("unknown fabric {s:?} (expected tcp, shm, verbs or auto)"))
    }
}

impl LinkArgs {
    fn timeout(&self) -> Result<Duration> {
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout < 86_400.0) {
            anyhow::bail!(
                "--timeout must be between 0 and 86400 seconds, not {}",
                self.timeout
            );
        }
        Ok(Duration::from_secs_f64(self.timeout))
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let cfg = |fabric| -> Result<EndpointConfig> {
            Ok(EndpointConfig {
                fabric,
                token: self.token.as_ref().map(|t| t.as_bytes().to_vec()),
                timeout: self.timeout()?,
                streams: self.streams,
                ..EndpointConfig::default()
            })
        };
        match self.fabric {
            FabricArg::Fixed(f) => Ok(Endpoint::new(cfg(f)?)?),
            FabricArg::Auto => match Endpoint::new(cfg(FabricKind::Verbs)?) {
                Ok(ep) => Ok(ep),
                Err(e) => {
                    eprintln!("kvwire: note: {e}; using tcp");
                    Ok(Endpoint::new(cfg(FabricKind::Tcp)?)?)
                }
            },
        }
    }
}

/// `kvwire send`.
#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Receiver address (host:port).
    #[arg(long)]
    connect: String,
    /// KV file (.safetensors, tensor `kv`).
    input: PathBuf,
    /// Level: raw, q8, cg-high, cg-default, cg-low, lmcache, or auto (chosen per block from
    /// the measured link rate and codec speeds).
    #[arg(long)]
    level: LevelChoice,
    /// With --level auto: the lowest quality allowed (raw, q8, cg-high, cg-default, cg-low).
    #[arg(long)]
    floor: Option<Level>,
    /// With --level auto: the best quality predicted to have every layer decoded within this
    /// many milliseconds (CacheGen's deadline mode).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Pace block writes to this rate (bytes/s, or with a unit: 300mbit, 1gbit, 2.5GB).
    #[arg(long, value_parser = parse_rate)]
    pace: Option<u64>,
    /// Tokens per block.
    #[arg(long, default_value_t = 256)]
    chunk_tokens: usize,
    /// Hand the layers to the pipeline one at a time, this many milliseconds apart, as a
    /// prefill engine produces them (0: the whole cache at once).
    #[arg(long, default_value_t = 0)]
    layer_interval_ms: u64,
    #[command(flatten)]
    link: LinkArgs,
}

/// `kvwire recv`.
#[derive(Debug, Args)]
pub(crate) struct RecvArgs {
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: String,
    /// Where to write the received cache (.safetensors); with `--transfers` above 1, `{n}` in
    /// the path is replaced by the transfer's number (from 1), else each transfer overwrites
    /// the file.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Transfers to receive, one per connection, one after the other; each decodes into the
    /// memory of the last one's cache (warm pages, no allocation), as a long-lived decode
    /// worker would. 0: no limit (it ends when no sender comes within --accept-timeout).
    #[arg(long, default_value_t = 1)]
    transfers: u64,
    /// Receive slots (blocks in flight).
    #[arg(long, default_value_t = 16)]
    slots: u16,
    /// Bytes per receive slot (the largest block accepted).
    #[arg(long, default_value_t = 4 << 20)]
    slot_size: u64,
    /// Seconds to wait for the sender to connect.
    #[arg(long, default_value_t = 60.0)]
    accept_timeout: f64,
    /// Load (or measure, once per build and CPU) the codec calibration before listening, so
    /// a `--level auto` sender does not wait for it.
    #[arg(long)]
    calibrate: bool,
    #[command(flatten)]
    link: LinkArgs,
}

/// `--level`: a fixed level or `auto`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LevelChoice(Option<Level>);

impl std::str::FromStr for LevelChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "auto" {
            return Ok(Self(None));
        }
        s.parse::<Level>()
            .map(|l| Self(Some(l)))
            .map_err(|e| format!("{e} (or auto)"))
    }
}

/// A rate in bytes/s: a plain number, or with a bit (kbit, mbit, gbit) or byte (KB, MB, GB)
/// unit, decimal.
fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("not a rate: {s}"))?;
    let scale = match unit {
        "" | "b" => 1.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => {
            return Err(format!(
                "unknown rate unit in {s} (kbit, mbit, gbit, KB, MB, GB)"
            ))
        }
    };
    let r = v * scale;
    if !(1.0..1e15).contains(&r) {
        return Err(format!("rate out of range: {s}"));
    }
    Ok(r as u64)
}

pub(crate) fn send(a: &SendArgs) -> Result<()> {
    if a.level.0.is_some() && (a.floor.is_some() || a.deadline_ms.is_some()) {
        anyhow::bail!("--floor and --deadline-ms need --level auto");
    }
    let kv = file::load(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let ep = a.link.endpoint()?;
    let conn = ep
        .connect(a.connect.as_str())
        .with_context(|| format!("connecting to {}", a.connect))?;
    let mut enc = EncodeOptions::level(a.level.0.unwrap_or(Level::Raw));
    enc.chunk_tokens = a.chunk_tokens;
    let policy = match a.level.0 {
        Some(_) => None,
        None => Some(PolicyOptions {
            floor: a.floor,
            deadline: a.deadline_ms.map(Duration::from_millis),
            calibration: Some(Calibration::cached().context("calibrating the codec")?),
            ..PolicyOptions::default()
        }),
    };
    let opts = SendOptions {
        threads: a.link.threads,
        timeout: a.link.timeout()?,
        policy,
        pace: a.pace,
        ..SendOptions::new(enc)
    };
    let level_name = a.level.0.map_or("auto".to_string(), |l| l.to_string());
    let cpu_before = process_cpu();
    let st = if a.layer_interval_ms == 0 {
        send_kv(&conn, &kv.cache.view(), &opts).context("sending")?
    } else {
        let spec = *kv.cache.spec();
        let mut one = spec;
        one.shape.layers = 1;
        let es = spec.dtype.size();
        let mut tx = KvSender::begin(&conn, spec, &opts).context("starting the transfer")?;
        for layer in 0..spec.shape.layers {
            if layer > 0 {
                std::thread::sleep(Duration::from_millis(a.layer_interval_ms));
            }
            let r = spec.layer_range(layer);
            let view = KvView::new(one, &kv.cache.bytes()[r.start * es..r.end * es])?;
            tx.push_layer(layer, &view)
                .with_context(|| format!("sending layer {layer}"))?;
        }
        tx.finish().context("finishing the transfer")?
    };
    let cpu = process_cpu().saturating_sub(cpu_before);
    conn.close("");
    let spec = kv.cache.spec();
    let fp16 = (spec.shape.elements() * 2) as f64;
    let secs = st.elapsed.as_secs_f64();
    let policy = st.policy.map(|p| {
        serde_json::json!({
            "blocks_per_level": p.counts(),
            "first_link_gbps": p.first_rate as f64 * 8.0 / 1e9,
            "last_link_gbps": p.last_rate as f64 * 8.0 / 1e9,
            "rtt_us": p.rtt_ns as f64 / 1e3,
            "wire_cpu_ns_per_byte": p.wire_cpu_ps as f64 / 1e3,
            "switches": p.switches,
            "shared_cpu": p.shared_cpu,
            "probed": p.probed,
            "probe_blocks": p.probe_blocks,
            "first_level": Level::from_code(p.first_level).map(|l| l.to_string()),
            "last_level": Level::from_code(p.last_level).map(|l| l.to_string()),
        })
    });
    if a.link.json {
        println!(
            "{}",
            serde_json::json!({
                "level": level_name,
                "policy": policy,
                "fabric": ep.config().fabric.name(),
                "layers": spec.shape.layers,
                "tokens": spec.shape.tokens,
                "blocks": st.blocks,
                "input_bytes": st.input_bytes,
                "fp16_bytes": fp16 as u64,
                "wire_bytes": st.wire_bytes,
                "ratio_vs_fp16": fp16 / st.wire_bytes as f64,
                "last_layer_decoded_s": secs,
                "receiver_decode_s": st.receiver_decode.as_secs_f64(),
                "cpu_s": cpu.as_secs_f64(),
                "goodput_gbps": fp16 / secs / 1e9,
            })
        );
    } else {
        println!(
            "sent {} layers x {} tokens at {}: {} bytes on the wire ({:.2}x smaller than fp16), last layer decoded at the receiver after {:.1} ms, goodput {:.3} GB/s (fp16 bytes delivered per second)",
            spec.shape.layers,
            spec.shape.tokens,
            level_name,
            st.wire_bytes,
            fp16 / st.wire_bytes as f64,
            secs * 1e3,
            fp16 / secs / 1e9
        );
        if let Some(p) = st.policy {
            println!(
                "policy: blocks per level {}; link estimate {:.3} Gbit/s at the first block, {:.3} at the last (probe round trip {:.0} µs, transport CPU {:.2} ns per byte sent); {} level switches",
                p.counts(),
                p.first_rate as f64 * 8.0 / 1e9,
                p.last_rate as f64 * 8.0 / 1e9,
                p.rtt_ns as f64 / 1e3,
                p.wire_cpu_ps as f64 / 1e3,
                p.switches
            );
        }
    }
    Ok(())
}

pub(crate) fn recv(a: &RecvArgs) -> Result<()> {
    let ep = a.link.endpoint()?;
    // With --calibrate, measured (or read from the cache) now rather than while a sender waits
    // for our Ready: the decode speeds reported to a `--level auto` sender come from it.
    if a.calibrate {
        Calibration::cached().context("calibrating the codec")?;
    }
    let slots = RecvSlots::register(&ep, a.slots, a.slot_size)?;
    let listener = ep
        .listen(a.listen.as_str())
        .with_context(|| format!("listening on {}", a.listen))?;
    if !(a.accept_timeout.is_finite() && a.accept_timeout > 0.0 && a.accept_timeout < 86_400.0) {
        anyhow::bail!("--accept-timeout must be between 0 and 86400 seconds");
    }
    let opts = RecvOptions {
        threads: a.link.threads,
        timeout: a.link.timeout()?,
        ..RecvOptions::default()
    };
    let mut memory = Vec::new();
    let mut n = 0u64;
    while a.transfers == 0 || n < a.transfers {
        n += 1;
        let conn = listener.accept(Duration::from_secs_f64(a.accept_timeout))?;
        let cache = recv_one(a, &ep, &conn, &slots, &opts, memory, n)?;
        // In order, now: the close waits until the transfer's confirmation has left.
        conn.close("");
        memory = cache.into_bytes();
    }
    Ok(())
}

/// Receives transfer number `n` on `conn` into `memory` (reused when large enough), writes
/// it out and reports it; gives the cache back for the next transfer's memory.
fn recv_one(
    a: &RecvArgs,
    ep: &Endpoint,
    conn: &Connection,
    slots: &RecvSlots,
    opts: &RecvOptions,
    memory: Vec<u8>,
    n: u64,
) -> Result<KvCache> {
    let capacity = memory.capacity();
    let cpu_before = process_cpu();
    let rx = KvReceiver::accept_whole_into(conn, slots, opts, memory)
        .context("starting the transfer")?;
    let levels = rx.levels();
    let level = if levels.len() == 1 {
        levels[0].to_string()
    } else {
        "auto".to_string()
    };
    let (cache, st) = rx.recv_all().context("receiving")?;
    let cpu = process_cpu().saturating_sub(cpu_before);
    let reused = capacity >= cache.bytes().len();
    let output = if a.transfers == 1 {
        a.output.clone()
    } else {
        PathBuf::from(a.output.to_string_lossy().replace("{n}", &n.to_string()))
    };
    file::save(&output, &cache, &HashMap::new())
        .with_context(|| format!("writing {}", output.display()))?;
    let spec = cache.spec();
    if a.link.json {
        println!(
            "{}",
            serde_json::json!({
                "transfer": n,
                "level": level,
                "fabric": ep.config().fabric.name(),
                "layers": spec.shape.layers,
                "tokens": spec.shape.tokens,
                "blocks": st.blocks,
                "wire_bytes": st.wire_bytes,
                "elapsed_s": st.elapsed.as_secs_f64(),
                "cpu_s": cpu.as_secs_f64(),
                "memory_reused": reused,
                "output": output.display().to_string(),
            })
        );
    } else {
        println!(
            "received {} layers x {} tokens ({}, {} layout) at {}: {} block bytes in {:.1} ms; wrote {}",
            spec.shape.layers,
            spec.shape.tokens,
            spec.dtype,
            spec.layout.name(),
            level,
            st.wire_bytes,
            st.elapsed.as_secs_f64() * 1e3,
            output.display()
        );
    }
    Ok(cache)
}

/// CPU time of this process so far, all its threads (those that ended included).
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}
