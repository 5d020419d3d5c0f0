//! `kvwire demo`: ship the embedded real KV cache from a sender to a receiver over loopback
//! at a few emulated link rates (paced sends), every level and `auto`, and print what each
//! took until the receiver held the decoded cache.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvwire_codec::{file, EncodeOptions, Level};
use kvwire_transport::policy::{Calibration, PolicyOptions};
use kvwire_transport::session::{send_kv, KvReceiver, RecvOptions, RecvSlots, SendOptions};
use kvwire_transport::{Endpoint, EndpointConfig, FabricKind};

use crate::codec_cmd::EMBEDDED_KV;

/// `kvwire demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Emulated link rates in Gbit/s, comma-separated; `unpaced` for loopback as fast as it
    /// goes.
    #[arg(long, default_value = "unpaced,10,1,0.3")]
    rates: String,
    /// Transfers per (rate, level); the median time is shown.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

/// One link rate of the table: bytes/s, or `None` for unpaced.
fn parse_rates(s: &str) -> Result<Vec<Option<f64>>> {
    s.split(',')
        .map(|r| match r.trim() {
            "unpaced" => Ok(None),
            g => {
                let v: f64 = g
                    .parse()
                    .with_context(|| format!("--rates: {g:?} is not a number of Gbit/s"))?;
                if !(v.is_finite() && (0.001..=1000.0).contains(&v)) {
                    bail!("--rates: {v} Gbit/s is outside 0.001..1000");
                }
                Ok(Some(v * 1e9 / 8.0))
            }
        })
        .collect()
}

struct Row {
    rate: Option<f64>,
    level: String,
    wire_bytes: u64,
    secs: f64,
    auto_counts: Option<String>,
}

pub(crate) fn run(a: DemoArgs) -> Result<()> {
    let rates = parse_rates(&a.rates)?;
    if a.reps == 0 || a.reps > 100 {
        bail!("--reps must be 1..=100");
    }
    let (view, _) = file::view_safetensors(EMBEDDED_KV).context("the embedded KV cache")?;
    let spec = *view.spec();
    let fp16 = (spec.shape.elements() * 2) as f64;
    // Codec speeds for `auto` (measured once, then cached under the user's cache dir).
    let calibration = Calibration::cached().context("calibrating the codec")?;
    let cfg = EndpointConfig {
        timeout: Duration::from_secs(20),
        ..EndpointConfig::new(FabricKind::Tcp)
    };
    let er = Endpoint::new(cfg.clone())?;
    let es = Endpoint::new(cfg)?;
    let slots = RecvSlots::register(&er, 16, 4 << 20)?;
    let listener = er.listen("127.0.0.1:0")?;
    let addr = listener.local_addr();
    let tx = es.connect(addr).context("connecting over loopback")?;
    let rx = listener.accept(Duration::from_secs(20))?;
    let ro = RecvOptions {
        timeout: Duration::from_secs(20),
        ..RecvOptions::default()
    };
    let mut choices: Vec<Option<Level>> = Level::ALL.iter().copied().map(Some).collect();
    choices.push(None); // auto
    let total = rates.len() * choices.len() * a.reps;
    let mut rows = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        // The receiver says, per transfer, whether the cache arrived bit-exact.
        let receiver = s.spawn(|| -> Result<Vec<bool>> {
            let original = view.to_layout(spec.layout);
            (0..total)
                .map(|_| {
                    let (got, _) = KvReceiver::accept_whole(&rx, &slots, &ro)
                        .and_then(KvReceiver::recv_all)
                        .context("receiving")?;
                    if got.spec() != original.spec() {
                        bail!("received a cache of another shape");
                    }
                    Ok(got.bytes() == original.bytes())
                })
                .collect()
        });
        let sent = (|| -> Result<()> {
            for &rate in &rates {
                for &choice in &choices {
                    let mut times = Vec::with_capacity(a.reps);
                    let mut last = None;
                    for _ in 0..a.reps {
                        let opts = SendOptions {
                            timeout: Duration::from_secs(20),
                            pace: rate.map(|r| r as u64),
                            policy: choice.is_none().then(|| PolicyOptions {
                                calibration: Some(calibration.clone()),
                                ..PolicyOptions::default()
                            }),
                            ..SendOptions::new(EncodeOptions::level(choice.unwrap_or(Level::Raw)))
                        };
                        let st = send_kv(&tx, &view, &opts).context("sending")?;
                        times.push(st.elapsed.as_secs_f64());
                        last = Some(st);
                    }
                    times.sort_by(f64::total_cmp);
                    let st = last.expect("reps >= 1");
                    rows.push(Row {
                        rate,
                        level: choice.map_or("auto".into(), |l| l.to_string()),
                        wire_bytes: st.wire_bytes,
                        secs: times[times.len() / 2],
                        auto_counts: st.policy.map(|p| p.counts()),
                    });
                }
            }
            Ok(())
        })();
        let exact = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
        sent?;
        // Transfers went rate by rate, level by level, `reps` each: raw ones must be exact.
        let exact = exact?;
        let raw_index = choices.iter().position(|&c| c == Some(Level::Raw));
        for (i, &ok) in exact.iter().enumerate() {
            if Some(i / a.reps % choices.len()) == raw_index && !ok {
                bail!("a raw transfer did not arrive bit-exact");
            }
        }
        Ok(())
    })?;
    tx.close("");
    print(&rows, fp16, &spec, a.json, a.reps);
    Ok(())
}

fn rate_name(r: Option<f64>) -> String {
    r.map_or("unpaced loopback".into(), |b| {
        format!("{:.3} Gbit/s", b * 8.0 / 1e9)
    })
}

fn print(rows: &[Row], fp16: f64, spec: &kvwire_codec::KvSpec, json: bool, reps: usize) {
    if json {
        for r in rows {
            println!(
                "{}",
                serde_json::json!({
                    "rate_gbps": r.rate.map(|b| b * 8.0 / 1e9),
                    "level": r.level,
                    "wire_bytes": r.wire_bytes,
                    "ratio_vs_fp16": fp16 / r.wire_bytes as f64,
                    "last_layer_decoded_s": r.secs,
                    "auto_blocks": r.auto_counts,
                })
            );
        }
        return;
    }
    println!(
        "kvwire demo: the embedded KV cache of SmolLM2-135M ({} layers x {} tokens, {:.1} MB as fp16) sent over loopback TCP, paced to each rate; time = until the receiver held every layer decoded (median of {reps})",
        spec.shape.layers,
        spec.shape.tokens,
        fp16 / 1e6
    );
    for chunk in rows.chunk_by(|a, b| a.rate == b.rate) {
        let best = chunk
            .iter()
            .filter(|r| r.level != "auto")
            .min_by(|a, b| a.secs.total_cmp(&b.secs));
        println!("\n{}", rate_name(chunk[0].rate));
        println!(
            "  {:<11} {:>10} {:>8} {:>10}",
            "level", "wire MB", "x fp16", "time ms"
        );
        for r in chunk {
            let mark = match (best, &r.auto_counts) {
                (Some(b), None) if std::ptr::eq(b, r) => "  <- fastest fixed level".to_string(),
                (Some(b), Some(c)) => format!(
                    "  auto chose {c}: {:.2}x the fastest fixed level ({})",
                    r.secs / b.secs,
                    b.level
                ),
                _ => String::new(),
            };
            println!(
                "  {:<11} {:>10.2} {:>8.2} {:>10.1}{mark}",
                r.level,
                r.wire_bytes as f64 / 1e6,
                fp16 / r.wire_bytes as f64,
                r.secs * 1e3
            );
        }
    }
}
