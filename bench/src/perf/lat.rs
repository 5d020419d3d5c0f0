//! write_lat: ping-pong of one-sided writes with an immediate. The client writes into the
//! server's region; the server, notified, writes the same bytes back into the client's
//! region; the client's notification ends the round trip. Reported: round trip / 2.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use kvwire_transport::{Connection, Event, Region, RegionId, RegionSlice, SendBuf};

use super::control::Control;
use super::report::LatRow;

/// Client: `iters` round trips of `size` bytes.
pub(crate) fn client(
    conn: &Connection,
    ctl: &Control,
    local: &Arc<Region>,
    remote: RegionId,
    size: u64,
    iters: u64,
) -> Result<LatRow> {
    let mut half_us = Vec::with_capacity(iters as usize);
    for i in 0..iters {
        let slice = RegionSlice::new(local.clone(), 0, size)?;
        let t0 = Instant::now();
        conn.post_write(SendBuf::Region(slice), remote, 0, Some(i as u32), i)?;
        loop {
            match conn.poll(ctl.timeout)? {
                Some(Event::Notify(n)) if n.imm == Some(i as u32) => break,
                Some(_) => {}
                None => bail!("no reply to ping {i} within {:?}", ctl.timeout),
            }
        }
        half_us.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    Ok(stats(size, &mut half_us))
}

/// Server: answers every notification with a write of the same length back into the
/// client's first writable region. Returns how many it answered.
pub(crate) fn answer(
    conn: &Connection,
    local: &Arc<Region>,
    back: RegionId,
    ev: Event,
    n: &mut u64,
) -> Result<()> {
    if let Event::Notify(note) = ev {
        let slice = RegionSlice::new(local.clone(), 0, note.len)?;
        conn.post_write(SendBuf::Region(slice), back, 0, note.imm, *n)?;
        *n += 1;
    }
    Ok(())
}

/// min, max, median, mean, standard deviation and the 99 / 99.9 % percentiles.
pub(crate) fn stats(size: u64, v: &mut [f64]) -> LatRow {
    v.sort_by(f64::total_cmp);
    let n = v.len().max(1);
    let pct = |p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let idx = ((p * n as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[idx]
    };
    let avg = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n as f64;
    LatRow {
        size,
        iterations: v.len() as u64,
        t_min: v.first().copied().unwrap_or(0.0),
        t_max: v.last().copied().unwrap_or(0.0),
        t_typical: if v.is_empty() { 0.0 } else { v[v.len() / 2] },
        t_avg: avg,
        t_stdev: var.sqrt(),
        p99: pct(0.99),
        p99_9: pct(0.999),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let mut v: Vec<f64> = (1..=1000).map(f64::from).collect();
        let r = super::stats(2, &mut v);
        assert_eq!(
            (r.t_min, r.t_max, r.p99, r.p99_9),
            (1.0, 1000.0, 990.0, 999.0)
        );
        assert_eq!(r.t_typical, 501.0);
        assert!((r.t_avg - 500.5).abs() < 1e-9);
    }
}
