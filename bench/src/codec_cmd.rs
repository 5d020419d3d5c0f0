//! `kvwire codec …` and `kvwire demo`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kvwire_codec::{file, EncodeOptions, Level};

use crate::eval::{evaluate, print_table, EvalConfig};

/// The embedded default KV cache: 256 tokens of SmolLM2-135M-Instruct on CPython's pydoc
/// topics (tools/realkv made it).
pub(crate) static EMBEDDED_KV: &[u8] =
    include_bytes!("../../codec/testdata/smollm2-pydoc-256.safetensors");

#[derive(Debug, Subcommand)]
pub(crate) enum CodecCmd {
    /// Compress a KV file (.safetensors) into a kvwire bitstream (.kvw).
    Encode {
        /// Input KV file.
        input: PathBuf,
        /// Level: raw, q8, cg-high, cg-default, cg-low, lmcache.
        #[arg(long, short = 'l', default_value = "cg-default")]
        level: Level,
        /// Tokens per block.
        #[arg(long, default_value_t = kvwire_codec::DEFAULT_CHUNK_TOKENS)]
        chunk_tokens: usize,
        /// Divide K by per-channel scales before quantizing.
        #[arg(long)]
        channel_scale_k: bool,
        /// Output file.
        #[arg(short = 'o', long)]
        output: PathBuf,
    },
    /// Decompress a kvwire bitstream back into a KV file (same layout and dtype).
    Decode {
        /// Input bitstream.
        input: PathBuf,
        /// Output KV file.
        #[arg(short = 'o', long)]
        output: PathBuf,
    },
    /// Per level: size, ratios, speed and error on a KV file.
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
pub(crate) struct EvalArgs {
    /// Input KV file.
    input: PathBuf,
    #[command(flatten)]
    common: CommonEval,
}

#[derive(Debug, Args)]
pub(crate) struct CommonEval {
    /// A level, or `all`.
    #[arg(long, short = 'l', default_value = "all")]
    level: String,
    /// Tokens per block.
    #[arg(long, default_value_t = kvwire_codec::DEFAULT_CHUNK_TOKENS)]
    chunk_tokens: usize,
    /// Divide K by per-channel scales before quantizing (lossy levels but lmcache).
    #[arg(long)]
    channel_scale_k: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repetitions per level (the best is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// One JSON object per level instead of a table.
    #[arg(long)]
    json: bool,
}

fn levels(s: &str) -> Result<Vec<Level>> {
    if s == "all" {
        return Ok(Level::ALL.to_vec());
    }
    s.split(',')
        .map(|l| l.parse::<Level>().map_err(anyhow::Error::msg))
        .collect()
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        b = b.num_threads(t);
    }
    Ok(b.build()?)
}

pub(crate) fn run(cmd: CodecCmd) -> Result<()> {
    match cmd {
        CodecCmd::Encode {
            input,
            level,
            chunk_tokens,
            channel_scale_k,
            output,
        } => {
            let buf = read(&input)?;
            let (view, _) =
                file::view_safetensors(&buf).with_context(|| format!("{}", input.display()))?;
            let opts = EncodeOptions {
                level,
                chunk_tokens,
                channel_scale_k,
            };
            let out = kvwire_codec::encode(&view, &opts)?;
            write(&output, &out)?;
            println!(
                "{} -> {}: {} bytes -> {} bytes ({:.2}x), level {level}",
                input.display(),
                output.display(),
                view.bytes().len(),
                out.len(),
                view.bytes().len() as f64 / out.len() as f64
            );
            Ok(())
        }
        CodecCmd::Decode { input, output } => {
            let buf = read(&input)?;
            let kv = kvwire_codec::decode(&buf).with_context(|| format!("{}", input.display()))?;
            let bytes = file::write_safetensors(&kv, &Default::default())?;
            write(&output, &bytes)?;
            let s = kv.spec();
            println!(
                "{} -> {}: {:?} {} {}",
                input.display(),
                output.display(),
                s.shape.dims(s.layout),
                s.layout.name(),
                s.dtype
            );
            Ok(())
        }
        CodecCmd::Eval(a) => {
            let buf = read(&a.input)?;
            eval_buffer(&buf, &a.input.display().to_string(), &a.common)
        }
    }
}

fn eval_buffer(buf: &[u8], name: &str, c: &CommonEval) -> Result<()> {
    let (view, meta) = file::view_safetensors(buf).with_context(|| name.to_string())?;
    let cfg = EvalConfig {
        levels: levels(&c.level)?,
        chunk_tokens: c.chunk_tokens,
        channel_scale_k: c.channel_scale_k,
        reps: c.reps.max(1),
    };
    let pool = pool(c.threads)?;
    let threads = pool.current_num_threads();
    let rows = pool.install(|| evaluate(&view, &cfg))?;
    if c.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        let s = view.spec();
        println!(
            "{name}: model {}, {:?} {} {}, {} tokens, chunk {} tokens, {threads} threads",
            meta.get("model").map(String::as_str).unwrap_or("?"),
            s.shape.dims(s.layout),
            s.layout.name(),
            s.dtype,
            s.shape.tokens,
            cfg.chunk_tokens
        );
        print_table(&rows);
    }
    Ok(())
}
