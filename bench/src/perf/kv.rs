//! `perf kv`: whole KV caches through the session API (`send_kv` / `KvReceiver`), one data
//! connection per level, timed to the receiver's report that the last layer decoded.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kvwire_codec::{file, EncodeOptions, KvCache, Level};
use kvwire_transport::policy::{Calibration, PolicyOptions};
use kvwire_transport::session::{send_kv, KvReceiver, RecvOptions, RecvSlots, SendOptions};
use kvwire_transport::{Endpoint, Listener};

use super::options::{Exchanged, PerfArgs};
use super::progress::Progress;
use super::report::KvRow;
use super::synthetic::{generate, ModelShape};

/// Receive slots and their size on the server (blocks in flight, largest block).
pub(crate) const SLOTS: u16 = 16;
/// Bytes per receive slot.
pub(crate) const SLOT_SIZE: u64 = 8 << 20;

/// The cache the client ships, and a one-line description of where it came from.
pub(crate) fn load_cache(a: &PerfArgs, ex: &Exchanged) -> Result<(KvCache, String)> {
    if let Some(p) = &a.input {
        let kv = file::load(p).with_context(|| format!("reading {}", p.display()))?;
        return Ok((kv.cache, format!("file {}", p.display())));
    }
    let name = ex.synthetic.as_deref().unwrap_or("llama-3-8b");
    let m = ModelShape::by_name(name)?;
    let cache = generate(m, ex.tokens, ex.seed)?;
    Ok((
        cache,
        format!("synthetic {name} ({} tokens, seed {})", ex.tokens, ex.seed),
    ))
}

/// The levels to run: `None` is `auto`.
fn levels(ex: &Exchanged) -> Result<Vec<Option<Level>>> {
    ex.levels
        .iter()
        .map(|s| match s.as_str() {
            "auto" => Ok(None),
            l => l
                .parse::<Level>()
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{e}")),
        })
        .collect()
}

fn name(l: Option<Level>) -> String {
    l.map_or_else(|| "auto".to_string(), |l| l.to_string())
}

/// Client: one transfer per level.
pub(crate) fn client(
    ep: &Endpoint,
    data: SocketAddr,
    timeout: Duration,
    ex: &Exchanged,
    cache: &KvCache,
    progress: &mut Progress,
) -> Result<Vec<KvRow>> {
    let fp16 = (cache.spec().shape.elements() * 2) as u64;
    let mut rows = Vec::new();
    let calibration = if levels(ex)?.contains(&None) {
        Some(Calibration::cached().context("calibrating the codec for auto")?)
    } else {
        None
    };
    for choice in levels(ex)? {
        let level = name(choice);
        let conn = ep
            .connect(data)
            .with_context(|| format!("connecting for level {level}"))?;
        let opts = SendOptions {
            timeout,
            policy: choice.is_none().then(|| PolicyOptions {
                calibration: calibration.clone(),
                ..PolicyOptions::default()
            }),
            ..SendOptions::new(EncodeOptions::level(choice.unwrap_or(Level::Raw)))
        };
        let st = send_kv(&conn, &cache.view(), &opts)
            .with_context(|| format!("sending at level {level}"))?;
        conn.close("");
        let secs = st.elapsed.as_secs_f64().max(1e-9);
        progress.step(&format!("level {level}"));
        rows.push(KvRow {
            auto_blocks: st.policy.map(|p| p.counts()),
            level,
            wire_bytes: st.wire_bytes,
            fp16_bytes: fp16,
            ratio: fp16 as f64 / st.wire_bytes.max(1) as f64,
            last_layer_decoded_s: secs,
            goodput_gbps: fp16 as f64 * 8.0 / secs / 1e9,
            speedup_vs_raw: None,
        });
    }
    if let Some(raw) = rows
        .iter()
        .find(|r| r.level == "raw")
        .map(|r| r.goodput_gbps)
    {
        for r in &mut rows {
            r.speedup_vs_raw = Some(r.goodput_gbps / raw);
        }
    }
    Ok(rows)
}

/// Server: receives one cache per level; returns the bytes received per level.
pub(crate) fn server(
    listener: &Listener,
    slots: &RecvSlots,
    timeout: Duration,
    ex: &Exchanged,
) -> Result<()> {
    for choice in levels(ex)? {
        let level = name(choice);
        let conn = listener
            .accept(timeout)
            .with_context(|| format!("waiting for the transfer at level {level}"))?;
        let opts = RecvOptions {
            timeout,
            ..RecvOptions::default()
        };
        let rx = KvReceiver::accept_whole(&conn, slots, &opts)
            .with_context(|| format!("starting the transfer at level {level}"))?;
        let got = rx.levels();
        if choice.is_some_and(|l| got != [l]) || got.is_empty() {
            bail!("expected a transfer at level {level}, the client sent {got:?}");
        }
        rx.recv_all()
            .with_context(|| format!("receiving at level {level}"))?;
    }
    Ok(())
}
