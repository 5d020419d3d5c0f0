//! write_bw / read_bw (client side): keep `-t` one-sided operations in flight against the
//! server's region, time first post to last completion per message size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kvwire_transport::{Connection, Event, Region, RegionId, RegionSlice, SendBuf};

use super::control::Control;
use super::options::{Exchanged, TestKind};
use super::progress::Progress;
use super::report::{to_unit, BwRow};

/// Completions per peak-bandwidth group (perftest's CQ moderation default)...
const PEAK_GROUP: u64 = 100;
/// ... and the shortest group: completions arrive in bursts, and a burst of 100 in a few
/// microseconds says nothing about the link.
const PEAK_MIN_TIME: Duration = Duration::from_millis(5);

/// The data connection and the two regions.
pub(crate) struct BwTarget<'a> {
    /// Data connection.
    pub(crate) conn: &'a Connection,
    /// Our region (source of writes, destination of reads).
    pub(crate) local: &'a Arc<Region>,
    /// The server's region.
    pub(crate) remote: RegionId,
}

/// Measures one message size.
pub(crate) fn measure(
    t: &BwTarget<'_>,
    ctl: &Control,
    ex: &Exchanged,
    size: u64,
    progress: &mut Progress,
) -> Result<BwRow> {
    let depth = u64::from(ex.tx_depth);
    let deadline = ex
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d));
    let (mut posted, mut done) = (0u64, 0u64);
    let mut last_tick = Instant::now();
    let start = Instant::now();
    let mut group_start = start;
    let mut best_rate = 0f64;
    let mut group_done = 0u64;
    let mut last = start;
    // Peak: the best of groups of at least a tenth of the run. Completions arrive in bursts
    // (a write completes once the socket or the peer's mapping took it), so shorter groups
    // measure bursts, not the link.
    let min_group = PEAK_GROUP.max(ex.iters / 10);
    let min_time = ex.duration.map_or(PEAK_MIN_TIME, |d| {
        PEAK_MIN_TIME.max(Duration::from_secs_f64(d / 10.0))
    });
    let more = |posted: u64| match deadline {
        Some(d) => Instant::now() < d,
        None => posted < ex.iters,
    };
    loop {
        while posted - done < depth && more(posted) {
            let slice = RegionSlice::new(t.local.clone(), 0, size)?;
            match ex.test {
                TestKind::ReadBw => t.conn.post_read(t.remote, 0, slice, posted)?,
                _ => t
                    .conn
                    .post_write(SendBuf::Region(slice), t.remote, 0, None, posted)?,
            }
            posted += 1;
        }
        if done == posted && !more(posted) {
            break;
        }
        match t.conn.poll(ctl.timeout)? {
            Some(Event::WriteDone { .. } | Event::ReadDone { .. }) => {
                done += 1;
                last = Instant::now();
                group_done += 1;
                if group_done >= min_group && last - group_start >= min_time {
                    let rate = (size * group_done) as f64 / (last - group_start).as_secs_f64();
                    best_rate = best_rate.max(rate);
                    group_start = last;
                    group_done = 0;
                }
            }
            Some(_) => {}
            None => bail!(
                "no completion within {:?} ({done} of {posted} done)",
                ctl.timeout
            ),
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            ctl.send(&serde_json::json!({"tick": done}))?;
            last_tick = Instant::now();
            progress.note(&format!("{size} bytes: {done} messages"));
        }
    }
    let secs = (last - start).as_secs_f64().max(1e-9);
    let bytes = (size * done) as f64;
    let avg = bytes / secs;
    // Fewer than one full group: the average is the best estimate there is.
    let peak = best_rate.max(avg);
    Ok(BwRow {
        size,
        iterations: done,
        peak: to_unit(peak.max(avg), ex.report_gbits),
        average: to_unit(avg, ex.report_gbits),
        msg_rate: done as f64 / secs / 1e6,
        seconds: secs,
        baseline: None,
    })
}
