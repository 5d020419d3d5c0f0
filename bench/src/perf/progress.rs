//! Progress of long runs: an indicatif bar on a terminal, plain lines on stderr otherwise,
//! nothing for short runs.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Progress over `total` steps (message sizes or levels).
pub(crate) enum Progress {
    /// A bar on the terminal.
    Bar(ProgressBar),
    /// Plain lines on stderr.
    Lines {
        /// Steps done.
        done: u64,
        /// Steps.
        total: u64,
    },
    /// Nothing (a single step).
    Quiet,
}

impl Progress {
    /// Progress over `total` steps; shown only when there is more than one.
    pub(crate) fn new(total: u64, what: &str) -> Self {
        if total <= 1 {
            return Self::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} {msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(what.to_string());
            Self::Bar(bar)
        } else {
            Self::Lines { done: 0, total }
        }
    }

    /// One step finished.
    pub(crate) fn step(&mut self, msg: &str) {
        match self {
            Self::Bar(b) => {
                b.set_message(msg.to_string());
                b.inc(1);
            }
            Self::Lines { done, total } => {
                *done += 1;
                eprintln!("progress: {done}/{total} {msg}");
            }
            Self::Quiet => {}
        }
    }

    /// A note within a step (bar only: plain output stays one line per step).
    pub(crate) fn note(&mut self, msg: &str) {
        if let Self::Bar(b) = self {
            b.set_message(msg.to_string());
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Self::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}
