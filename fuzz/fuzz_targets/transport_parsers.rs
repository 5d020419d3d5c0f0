//! The transport's parsers of untrusted bytes, each checked for a round trip.
//!
//! Input: byte 0 selects (`(b & 0x7f) % 3`, see `kvwire_fuzz::transport::SEL_*`):
//! - 0: `FrameHeader::parse` on the rest, zero-padded / truncated to 32 bytes. On `Ok`,
//!   `to_bytes` must give back the same 32 bytes, and they must parse to the same header.
//! - 1: `EndpointMeta::from_bytes` on the rest (bit 7 of byte 0: recompute the trailing
//!   CRC32C first, so that the fields behind the checksum are reached). On `Ok`, `to_bytes`
//!   must succeed, give back the same bytes, and parse to an equal value.
//! - 2: `SessionMsg::from_bytes` on the rest. On `Ok`, `to_bytes` must parse back to an
//!   equal message.
//!
//! Nothing may panic.
//!
//! Found: an `Abort` whose reason was not UTF-8 was decoded lossily and did not round-trip
//! (`regressions/transport_parsers/`, README.md); fixed in 7ef80dd.
#![no_main]

use kvwire_fuzz::transport::{header_bytes, reseal_meta, SEL_FRAME, SEL_META, SEL_RESEAL};
use kvwire_transport::meta::{MAX_ADDRS, MAX_META_LEN, MAX_REGIONS, MAX_STRING_LEN};
use kvwire_transport::proto::frame::{FrameHeader, FrameKind, MAX_MSG_LEN, MAX_REASON_LEN};
use kvwire_transport::session::msg::{
    SessionMsg, MAX_HEADER_LEN, MAX_LEVELS, MAX_RATES, MAX_REASON, MAX_SLOTS,
};
use kvwire_transport::EndpointMeta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match (sel & 0x7f) % 3 {
        SEL_FRAME => frame(rest),
        SEL_META => {
            let mut b = rest.to_vec();
            if sel & SEL_RESEAL != 0 {
                reseal_meta(&mut b);
            }
            meta(&b);
        }
        _ => session(rest),
    }
});

fn frame(rest: &[u8]) {
    let b = header_bytes(rest);
    let Ok(h) = FrameHeader::parse(&b) else {
        return;
    };
    let out = h.to_bytes();
    assert_eq!(out, b, "FrameHeader {h:?} reserializes differently");
    assert_eq!(FrameHeader::parse(&out).ok(), Some(h));
    // What parse promises: the immediate only on writes, bounded lengths where bounded.
    assert!(h.imm.is_none() || h.kind == FrameKind::Write, "{h:?}");
    let limit = match h.kind {
        FrameKind::Hello | FrameKind::Auth => Some(32),
        FrameKind::Ticket | FrameKind::Join => Some(16),
        FrameKind::Meta => Some(MAX_META_LEN as u64),
        FrameKind::Msg => Some(MAX_MSG_LEN),
        FrameKind::Close => Some(MAX_REASON_LEN),
        FrameKind::WriteAck => Some(0),
        FrameKind::Write | FrameKind::Read | FrameKind::ReadResp => None,
    };
    if let Some(l) = limit {
        assert!(h.len <= l, "{h:?} exceeds {l}");
    }
}

fn meta(b: &[u8]) {
    let Ok(m) = EndpointMeta::from_bytes(b) else {
        return;
    };
    assert!(b.len() <= MAX_META_LEN);
    assert!(m.addrs.len() <= MAX_ADDRS && m.regions.len() <= MAX_REGIONS);
    assert!(m.addrs.iter().all(|a| a.len() <= MAX_STRING_LEN));
    assert!(m.regions.iter().all(|r| r.handle.len() <= MAX_STRING_LEN));
    let out = match m.to_bytes() {
        Ok(o) => o,
        Err(e) => panic!("parsed metadata does not serialize: {e}\n{m:?}"),
    };
    assert!(out == b, "EndpointMeta reserializes differently\n{m:?}");
    match EndpointMeta::from_bytes(&out) {
        Ok(m2) => assert_eq!(m2, m),
        Err(e) => panic!("reserialized metadata does not parse: {e}\n{m:?}"),
    }
}

fn session(b: &[u8]) {
    let Ok(m) = SessionMsg::from_bytes(b) else {
        return;
    };
    match &m {
        SessionMsg::Begin { header } => {
            assert!(!header.is_empty() && header.len() <= MAX_HEADER_LEN)
        }
        SessionMsg::Ready { slots, .. } => assert!((1..=MAX_SLOTS).contains(slots)),
        SessionMsg::Grant { slots } => assert!(slots.len() <= MAX_SLOTS as usize),
        SessionMsg::Complete { .. } => {}
        SessionMsg::Abort { reason } => assert!(reason.len() <= MAX_REASON),
        SessionMsg::BeginLevels { headers } => assert!(
            (1..=MAX_LEVELS).contains(&headers.len())
                && headers.iter().all(|h| !h.is_empty() && h.len() <= MAX_HEADER_LEN)
        ),
        SessionMsg::ReadyRates {
            slots,
            decode_rates,
            ..
        } => assert!((1..=MAX_SLOTS).contains(slots) && decode_rates.len() <= MAX_RATES),
    }
    let out = m.to_bytes();
    match SessionMsg::from_bytes(&out) {
        Ok(m2) => assert!(
            m2 == m,
            "SessionMsg does not round-trip:\n parsed   {m:?}\n reparsed {m2:?}"
        ),
        Err(e) => panic!("reserialized session message does not parse: {e}\n{m:?}"),
    }
}
