//! `kvwire`: the command-line tool of kvwire.
//!
//! * `kvwire codec encode|decode|eval` — the KV-cache codec on `.safetensors` KV files;
//! * `kvwire send` / `kvwire recv` — ship a KV file between processes (TCP or shared memory);
//! * `kvwire demo` — an embedded real KV cache shipped over loopback at emulated link rates.
//!
//! Errors end the process with status 1 and one line on stderr; nothing panics on bad input.
#![forbid(unsafe_code)]

mod codec_cmd;
mod demo;
mod eval;
mod perf;
mod topo_cmd;
mod wire_cmd;

use clap::{Parser, Subcommand};

/// kvwire: move LLM KV caches between machines, compressed.
#[derive(Debug, Parser)]
#[command(name = "kvwire", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Encode, decode and evaluate KV files.
    #[command(subcommand)]
    Codec(codec_cmd::CodecCmd),
    /// Send a KV file to a `kvwire recv` (prints wire bytes, time to last layer decoded, goodput).
    Send(wire_cmd::SendArgs),
    /// Receive one KV file from a `kvwire send` and write it.
    Recv(wire_cmd::RecvArgs),
    /// Ship an embedded real KV cache (SmolLM2-135M) over loopback at emulated link rates:
    /// every level and `auto`, time until the receiver held it decoded.
    Demo(demo::DemoArgs),
    /// perftest-style benchmark: write_bw, read_bw, write_lat, kv (no host: server).
    Perf(perf::PerfArgs),
    /// Show the machine's topology: NUMA nodes, NICs, RDMA devices with GIDs, GPUs.
    Topo(topo_cmd::TopoArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, like every other error: clap's first line without its own prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("kvwire: error: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    init_logging();
    let r = match cli.cmd {
        Cmd::Codec(c) => codec_cmd::run(c),
        Cmd::Send(a) => wire_cmd::send(&a),
        Cmd::Recv(a) => wire_cmd::recv(&a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Perf(a) => perf::run(&a),
        Cmd::Topo(a) => topo_cmd::run(&a),
    };
    if let Err(e) = r {
        eprintln!("kvwire: error: {e:#}");
        std::process::exit(1);
    }
}

/// Sends the library's `tracing` events to stderr when `KVWIRE_LOG` holds a filter
/// (`KVWIRE_LOG=debug`, `KVWIRE_LOG=kvwire_transport::session=debug`); silent otherwise.
fn init_logging() {
    let Ok(filter) = std::env::var("KVWIRE_LOG") else {
        return;
    };
    match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init(),
        Err(e) => eprintln!("kvwire: warning: ignoring KVWIRE_LOG={filter:?}: {e}"),
    }
}
