//! Measures each level on one KV cache: size, ratios, speed and error.

use std::time::Instant;

use anyhow::Result;
use kvwire_codec::{DType, EncodeOptions, KvCache, KvView, Level};
use serde::Serialize;

/// What to evaluate.
#[derive(Debug, Clone)]
pub(crate) struct EvalConfig {
    pub(crate) levels: Vec<Level>,
    pub(crate) chunk_tokens: usize,
    pub(crate) channel_scale_k: bool,
    pub(crate) reps: usize,
}

/// One level's results (also the `--json` schema).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EvalRow {
    pub(crate) level: String,
    pub(crate) bytes: usize,
    pub(crate) bytes_per_token: f64,
    pub(crate) bits_per_element: f64,
    pub(crate) ratio_vs_fp16: f64,
    pub(crate) ratio_vs_q8: f64,
    pub(crate) encode_gbps: f64,
    pub(crate) decode_gbps: f64,
    pub(crate) max_abs_error: f64,
    pub(crate) rmse: f64,
    pub(crate) snr_db: f64,
    pub(crate) chunk_tokens: usize,
    pub(crate) threads: usize,
}

fn best_secs<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<(T, f64)> {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let t = Instant::now();
        let v = f()?;
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    Ok((out.expect("reps >= 1"), best))
}

/// Error statistics of `b` against `a` (same spec).
fn errors(a: &KvView<'_>, b: &KvCache) -> (f64, f64, f64) {
    let dt = a.spec().dtype;
    let es = dt.size();
    let (mut max, mut se, mut sx) = (0f64, 0f64, 0f64);
    let mut xa = vec![0f32; 4096];
    let mut xb = vec![0f32; 4096];
    for (ca, cb) in a.bytes().chunks(4096 * es).zip(b.bytes().chunks(4096 * es)) {
        let n = ca.len() / es;
        dt.load_f32(ca, &mut xa[..n]);
        dt.load_f32(cb, &mut xb[..n]);
        for (&x, &y) in xa[..n].iter().zip(&xb[..n]) {
            let d = (x as f64 - y as f64).abs();
            max = max.max(d);
            se += d * d;
            sx += x as f64 * x as f64;
        }
    }
    let n = a.spec().shape.elements() as f64;
    let snr = if se == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (sx / se).log10()
    };
    (max, (se / n).sqrt(), snr)
}

/// Evaluates every configured level (in the current rayon pool).
pub(crate) fn evaluate(view: &KvView<'_>, cfg: &EvalConfig) -> Result<Vec<EvalRow>> {
    let shape = view.spec().shape;
    let fp16_bytes = shape.elements() * DType::F16.size();
    let q8_len = kvwire_codec::encode(
        view,
        &EncodeOptions {
            level: Level::Q8,
            chunk_tokens: cfg.chunk_tokens,
            channel_scale_k: false,
        },
    )?
    .len();
    let mut rows = Vec::new();
    for &level in &cfg.levels {
        let opts = EncodeOptions {
            level,
            chunk_tokens: cfg.chunk_tokens,
            channel_scale_k: cfg.channel_scale_k && !matches!(level, Level::Raw | Level::Lmcache),
        };
        let (enc, te) = best_secs(cfg.reps, || Ok(kvwire_codec::encode(view, &opts)?))?;
        let (dec, td) = best_secs(cfg.reps, || Ok(kvwire_codec::decode(&enc)?))?;
        let (max, rmse, snr) = errors(view, &dec);
        rows.push(EvalRow {
            level: level.name().to_string(),
            bytes: enc.len(),
            bytes_per_token: enc.len() as f64 / shape.tokens as f64,
            bits_per_element: enc.len() as f64 * 8.0 / shape.elements() as f64,
            ratio_vs_fp16: fp16_bytes as f64 / enc.len() as f64,
            ratio_vs_q8: q8_len as f64 / enc.len() as f64,
            encode_gbps: fp16_bytes as f64 / te / 1e9,
            decode_gbps: fp16_bytes as f64 / td / 1e9,
            max_abs_error: max,
            rmse,
            snr_db: snr,
            chunk_tokens: cfg.chunk_tokens,
            threads: rayon::current_num_threads(),
        });
    }
    Ok(rows)
}

/// Prints rows as an aligned table.
pub(crate) fn print_table(rows: &[EvalRow]) {
    println!(
        "{:<11} {:>10} {:>9} {:>7} {:>8} {:>7} {:>8} {:>8} {:>10} {:>9} {:>7}",
        "level",
        "bytes",
        "B/token",
        "bits/el",
        "x fp16",
        "x q8",
        "enc GB/s",
        "dec GB/s",
        "max err",
        "RMSE",
        "SNR dB"
    );
    for r in rows {
        println!(
            "{:<11} {:>10} {:>9.0} {:>7.3} {:>8.2} {:>7.2} {:>8.3} {:>8.3} {:>10.4} {:>9.5} {:>7.1}",
            r.level,
            r.bytes,
            r.bytes_per_token,
            r.bits_per_element,
            r.ratio_vs_fp16,
            r.ratio_vs_q8,
            r.encode_gbps,
            r.decode_gbps,
            r.max_abs_error,
            r.rmse,
            r.snr_db
        );
    }
}
