//! The receiver's threads: the driver (polls the connection, checks each notification
//! against the granted slots, queues decodes, confirms the transfer) and the decoders.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvwire_codec::model::ModelRole;
use kvwire_codec::Decoder;

use super::super::msg::{BlockImm, SessionMsg};
use super::{LayerState, Shared};
use crate::error::{Result, TransportError};
use crate::link::{Event, Notification};

/// Polls the connection, checks each notification against the slots, and queues decodes;
/// once every block has landed it stops reading the connection, waits for the decoders and
/// confirms the transfer (so nothing of a next transfer is read by this one).
pub(super) fn drive(
    sh: &Shared,
    jobs: &Sender<Notification>,
    all_decoded: &Receiver<()>,
    timeout: Duration,
) {
    let mut granted = vec![true; usize::from(sh.slot_count)];
    let mut last_activity = Instant::now();
    let mut landed = 0usize;
    loop {
        if sh.failed.load(Ordering::Acquire) {
            return;
        }
        if landed == sh.total {
            match all_decoded.recv_timeout(timeout) {
                Ok(()) => {
                    let since = sh
                        .first_block
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .unwrap_or_else(Instant::now);
                    let done = SessionMsg::Complete {
                        blocks: sh.total as u32,
                        decode_ns: since.elapsed().as_nanos() as u64,
                    };
                    if let Err(e) = sh.conn.send_msg(&done.to_bytes()) {
                        sh.fail(e);
                    }
                }
                // A decoder failed (it reported that itself) or hung.
                Err(_) => {
                    if !sh.failed.load(Ordering::Acquire) {
                        sh.fail(TransportError::Timeout(timeout, "the decoders to finish"));
                    }
                }
            }
            return;
        }
        match sh.conn.poll(Duration::from_millis(20)) {
            Ok(Some(Event::Notify(n))) => {
                last_activity = Instant::now();
                if let Err(e) = check_notify(sh, &n, &mut granted) {
                    sh.fail(e);
                    return;
                }
                if sh.levels_on_wire && is_probe(&n) {
                    // A link probe: nothing to decode, the slot goes straight back.
                    let slot = n.imm.map_or(0, |i| BlockImm::unpack(i).slot);
                    granted[usize::from(slot)] = true;
                    let g = SessionMsg::Grant { slots: vec![slot] };
                    if let Err(e) = sh.conn.send_msg(&g.to_bytes()) {
                        sh.fail(e);
                        return;
                    }
                    continue;
                }
                landed += 1;
                let _ = jobs.send(n);
            }
            Ok(Some(Event::Message(m))) => match SessionMsg::from_bytes(&m) {
                Ok(SessionMsg::Abort { reason }) => {
                    sh.failed.store(true, Ordering::Release);
                    sh.emit(Err(TransportError::RemoteAbort(reason)));
                    return;
                }
                Ok(SessionMsg::Prepare { index }) if sh.levels_on_wire => {
                    let Some(d) = sh.decoders.get(usize::from(index)) else {
                        sh.fail(TransportError::Protocol(format!(
                            "Prepare names level {index} of {}",
                            sh.decoders.len()
                        )));
                        return;
                    };
                    tracing::debug!(level = %d.header().level, "sender announced a level: building its tables");
                    super::super::prepare_tables(d.header(), ModelRole::Decode);
                }
                Ok(other) => {
                    sh.fail(TransportError::Protocol(format!(
                        "unexpected {other:?} mid-transfer"
                    )));
                    return;
                }
                Err(e) => {
                    sh.fail(e);
                    return;
                }
            },
            Ok(Some(other)) => {
                sh.fail(TransportError::Protocol(format!(
                    "unexpected event mid-transfer: {other:?}"
                )));
                return;
            }
            Ok(None) => {
                // Slots come back from the decoders; they count as activity too.
                if last_activity.elapsed() > timeout {
                    let decoded = sh.decoded.load(Ordering::Acquire);
                    sh.fail(TransportError::Timeout(timeout, "the sender's next block"));
                    tracing::debug!(decoded, total = sh.total, "receive timed out");
                    return;
                }
            }
            Err(e) => {
                sh.failed.store(true, Ordering::Release);
                sh.emit(Err(e));
                return;
            }
        }
    }
}

/// A notification must name our receive region, start at a granted slot, fit in it, and
/// carry an immediate naming that slot.
fn check_notify(sh: &Shared, n: &Notification, granted: &mut [bool]) -> Result<()> {
    let Some(imm) = n.imm.map(BlockImm::unpack) else {
        return Err(TransportError::Protocol(
            "a block write without an immediate".into(),
        ));
    };
    let slot = usize::from(imm.slot);
    let at = u64::from(imm.slot) * sh.slot_size;
    if n.region != sh.slots.region
        || slot >= granted.len()
        || n.offset != at
        || n.len > sh.slot_size
        || n.len == 0
    {
        return Err(TransportError::Protocol(format!(
            "block write to region {} offset {} ({} bytes) does not match slot {slot}",
            n.region.0, n.offset, n.len
        )));
    }
    // Slots the decoders gave back are writable again. A decoder records the slot before
    // granting it to the sender, so a write into it can only arrive after this sees it.
    for s in sh
        .regrant
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        granted[usize::from(s)] = true;
    }
    if !granted[slot] {
        return Err(TransportError::Protocol(format!(
            "write into slot {slot}, which was not granted"
        )));
    }
    granted[slot] = false;
    Ok(())
}

pub(super) fn decode_loop(sh: &Shared, jobs: &Mutex<Receiver<Notification>>) {
    let mut block = Vec::new();
    let mut chunk_buf = Vec::new();
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv_timeout(Duration::from_millis(50))
        };
        let n = match job {
            Ok(n) => n,
            Err(RecvTimeoutError::Timeout) => {
                if sh.failed.load(Ordering::Acquire)
                    || sh.decoded.load(Ordering::Acquire) >= sh.total
                {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // A panic here would be a bug; it still must fail the transfer, not hang it.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_one(sh, &n, &mut block, &mut chunk_buf)
        }))
        .unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            Err(TransportError::Protocol(format!(
                "decoder panicked: {what}"
            )))
        });
        if let Err(e) = r {
            sh.fail(e);
            return;
        }
    }
}

fn decode_one(
    sh: &Shared,
    n: &Notification,
    block: &mut Vec<u8>,
    chunk_buf: &mut Vec<u8>,
) -> Result<()> {
    {
        let mut f = sh.first_block.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert_with(Instant::now);
    }
    let imm = n.imm.map(BlockImm::unpack).expect("checked by the driver");
    block.resize(n.len as usize, 0);
    sh.slots.mem.read_at(n.offset, block)?;
    // The block is ours now: the slot goes back to the sender at once.
    sh.regrant
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(imm.slot);
    sh.conn.send_msg(
        &SessionMsg::Grant {
            slots: vec![imm.slot],
        }
        .to_bytes(),
    )?;
    sh.wire_bytes.fetch_add(block.len(), Ordering::Relaxed);
    let (d, block) = if sh.levels_on_wire {
        let (&index, rest) = block
            .split_first()
            .ok_or_else(|| TransportError::Protocol("an empty block".into()))?;
        let d = sh.decoders.get(usize::from(index)).ok_or_else(|| {
            TransportError::Protocol(format!(
                "block (layer {}, chunk {}) names level {index} of {}",
                imm.layer,
                imm.chunk,
                sh.decoders.len()
            ))
        })?;
        (d, rest)
    } else {
        (&sh.decoders[0], &block[..])
    };
    let (bh, chunk) = d.block_header(block).map_err(|e| TransportError::Block {
        layer: imm.layer,
        chunk: imm.chunk,
        source: e.into(),
    })?;
    if bh.layer != imm.layer || chunk as u32 != imm.chunk {
        return Err(TransportError::Protocol(format!(
            "block (layer {}, chunk {chunk}) arrived under the immediate of (layer {}, chunk {})",
            bh.layer, imm.layer, imm.chunk
        )));
    }
    let cspec = d.chunk_spec(chunk);
    chunk_buf.resize(cspec.byte_len(), 0);
    let info = d
        .decode_block_chunk(block, chunk_buf)
        .map_err(|e| TransportError::Block {
            layer: imm.layer,
            chunk: imm.chunk,
            source: e,
        })?;
    let layer = info.layer;
    let finished = {
        let mut slot = sh.layers[layer].lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let mut buf = Vec::new();
            if !sh.collect {
                let len = d.layer_spec().byte_len();
                buf = crate::raw::zeroed_vec(len).ok_or_else(|| {
                    TransportError::Invalid(format!("cannot allocate a {len}-byte layer"))
                })?;
            }
            let chunks = d.header().chunks();
            *slot = Some(LayerState {
                buf,
                chunks_done: vec![false; chunks],
                remaining: chunks,
            });
        }
        let st = slot.as_mut().expect("set above");
        if st.chunks_done[chunk] {
            return Err(TransportError::Protocol(format!(
                "block (layer {layer}, chunk {chunk}) arrived twice"
            )));
        }
        if sh.collect {
            let mut cache = sh.cache.lock().unwrap_or_else(|p| p.into_inner());
            let cache = cache.as_mut().ok_or_else(|| {
                TransportError::Invalid("the received cache was already taken".into())
            })?;
            let r = super::layer_bytes(cache.spec(), layer);
            d.place_chunk(&info, chunk_buf, &mut cache.bytes_mut()[r])?;
        } else {
            d.place_chunk(&info, chunk_buf, &mut st.buf)?;
        }
        st.chunks_done[chunk] = true;
        st.remaining -= 1;
        if st.remaining == 0 {
            slot.take().map(|s| s.buf)
        } else {
            None
        }
    };
    let done = sh.decoded.fetch_add(1, Ordering::AcqRel) + 1;
    if let Some(buf) = finished {
        sh.emit(Ok((layer, buf)));
    }
    if done == sh.total {
        let _ = sh
            .all_decoded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(());
    }
    Ok(())
}

/// A probe write names layer 4095, chunk 4095 (free in multi-level transfers).
fn is_probe(n: &Notification) -> bool {
    n.imm
        .map(BlockImm::unpack)
        .is_some_and(|i| i.layer == 0xfff && i.chunk == 0xfff)
}

/// This machine's decode speed per level of the transfer over `threads` threads, from the
/// cached calibration (measured once if missing), each code marked
/// [`TABLES_READY`](super::super::msg::TABLES_READY) where the level's tables are built and
/// [`ACCEPTS_PREPARE`](super::super::msg::ACCEPTS_PREPARE); none if calibration fails.
pub(super) fn decode_rates(decoders: &[Decoder], threads: usize) -> Vec<(u8, u64)> {
    let cal = match crate::policy::Calibration::cached() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no codec calibration; not reporting decode speeds");
            return Vec::new();
        }
    };
    let threads = threads.min(cal.cores.max(1)) as f64;
    decoders
        .iter()
        .filter_map(|d| {
            let level = d.header().level;
            let ready = super::super::msg::ACCEPTS_PREPARE
                | if d.header().models_ready(ModelRole::Decode) {
                    super::super::msg::TABLES_READY
                } else {
                    0
                };
            cal.get(level)
                .map(|s| (level.code() | ready, (s.decode_rate * threads) as u64))
        })
        .collect()
}
