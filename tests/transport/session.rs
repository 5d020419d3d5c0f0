//! Whole KV transfers: every level over both fabrics (raw bit-exact, lossy within bound),
//! layer-at-a-time sending with in-order delivery, 100 back-to-back transfers, 8 concurrent
//! sessions, and the receiver's refusals (corrupt block, oversized announcement).

use std::time::Duration;

use kvwire_codec::{EncodeOptions, KvCache, Layout, Level};
use kvwire_tests::{check_within_bound, fixture, fixture_head, layer_cache};
use kvwire_transport::session::msg::{BlockImm, SessionMsg, ACCEPTS_PREPARE, LEVEL_CODE};
use kvwire_transport::session::{
    recv_kv, send_kv, KvReceiver, KvSender, RecvOptions, RecvSlots, SendOptions,
};
use kvwire_transport::{
    Connection, Endpoint, EndpointConfig, Event, FabricKind, SendBuf, TransportError,
};

use super::{config, FABRICS};

/// A receiving endpoint with registered slots, a sending endpoint, connected.
struct Link {
    tx: Connection,
    rx: Connection,
    slots: RecvSlots,
}

fn link(cfg: EndpointConfig, slots: u16, slot_size: u64) -> Link {
    let er = Endpoint::new(cfg.clone()).unwrap();
    let es = Endpoint::new(cfg).unwrap();
    let rs = RecvSlots::register(&er, slots, slot_size).unwrap();
    let l = er.listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr();
    let t = std::thread::spawn(move || es.connect(addr).unwrap());
    let rx = l.accept(Duration::from_secs(5)).unwrap();
    Link {
        tx: t.join().unwrap(),
        rx,
        slots: rs,
    }
}

fn opts(level: Level, chunk_tokens: usize) -> SendOptions {
    let mut e = EncodeOptions::level(level);
    e.chunk_tokens = chunk_tokens;
    SendOptions {
        timeout: Duration::from_secs(5),
        ..SendOptions::new(e)
    }
}

fn recv_opts() -> RecvOptions {
    RecvOptions {
        timeout: Duration::from_secs(5),
        ..RecvOptions::default()
    }
}

/// Sends `kv` on one thread, receives it whole on this one; returns what arrived.
fn transfer(l: &Link, kv: &KvCache, o: &SendOptions) -> KvCache {
    transfer_as(l, kv, o, true)
}

/// As [`transfer`]; `whole`: decoded straight into one cache ([`recv_kv`]), else layer by
/// layer into per-layer buffers copied into a cache ([`KvReceiver::accept`], `recv_all`).
fn transfer_as(l: &Link, kv: &KvCache, o: &SendOptions, whole: bool) -> KvCache {
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_kv(&l.tx, &kv.view(), o));
        let got = if whole {
            recv_kv(&l.rx, &l.slots, &recv_opts())
        } else {
            KvReceiver::accept(&l.rx, &l.slots, &recv_opts()).and_then(KvReceiver::recv_all)
        };
        // No thread of the finished transfer still holds the connection: dropping it now
        // would close it in order (a process exiting next loses no queued confirmation).
        assert_eq!(
            std::sync::Arc::strong_count(&l.rx),
            1,
            "a receive thread outlived its transfer"
        );
        let sent = sender.join().unwrap();
        let ((got, stats), sent) = match (got, sent) {
            (Ok(g), Ok(s)) => (g, s),
            (g, s) => panic!("receiver: {:?}\nsender: {s:?}", g.err()),
        };
        assert_eq!(sent.blocks, stats.blocks);
        assert!(
            sent.wire_bytes > stats.wire_bytes,
            "the header counts on the sender's side"
        );
        got
    })
}

#[test]
fn every_level_arrives_within_its_bound_over_both_fabrics() {
    let kv = fixture_head(6);
    for fabric in FABRICS {
        let l = link(config(fabric), 8, 1 << 20);
        for (level, whole) in Level::ALL.into_iter().flat_map(|l| [(l, true), (l, false)]) {
            let o = opts(level, 64);
            let got = transfer_as(&l, &kv, &o, whole);
            if let Err(m) = check_within_bound(&kv.view(), &got, &o.encode) {
                panic!("{fabric:?} {level:?} (whole: {whole}): {m}");
            }
            if level == Level::Raw {
                assert!(
                    got.bytes() == kv.bytes(),
                    "{fabric:?} (whole: {whole}): raw must be bit-exact"
                );
            }
        }
    }
}

#[test]
fn a_whole_receiver_decodes_into_given_memory_and_overwrites_every_byte() {
    let l = link(config(FabricKind::Tcp), 8, 1 << 20);
    let hf = fixture_head(4);
    let vllm = hf.view().to_layout(Layout::Vllm);
    let len = hf.bytes().len();
    // Memory holding garbage, with room to spare: a raw transfer must come out bit-exact,
    // so no byte of the garbage may survive, in either layout.
    let mut memory = vec![0xa5u8; len + 4096];
    for kv in [&hf, &vllm, &hf] {
        let at = memory.as_ptr();
        memory.iter_mut().for_each(|b| *b = 0xa5);
        let got = std::thread::scope(|s| {
            let sender = s.spawn(|| send_kv(&l.tx, &kv.view(), &opts(Level::Raw, 16)));
            let got = KvReceiver::accept_whole_into(&l.rx, &l.slots, &recv_opts(), memory)
                .and_then(KvReceiver::recv_all);
            sender.join().unwrap().unwrap();
            got.unwrap().0
        });
        assert_eq!(got.spec(), kv.spec());
        assert!(
            got.bytes() == kv.bytes(),
            "raw into reused memory is bit-exact"
        );
        assert_eq!(
            got.bytes().as_ptr(),
            at,
            "the given memory was used, not a copy"
        );
        memory = got.into_bytes();
    }
    // A lossy level into the same memory; then memory too small for the cache: a fresh one.
    for memory in [memory, vec![0xa5u8; len / 2]] {
        let o = opts(Level::CgDefault, 16);
        let got = std::thread::scope(|s| {
            let sender = s.spawn(|| send_kv(&l.tx, &hf.view(), &o));
            let got = KvReceiver::accept_whole_into(&l.rx, &l.slots, &recv_opts(), memory)
                .and_then(KvReceiver::recv_all);
            sender.join().unwrap().unwrap();
            got.unwrap().0
        });
        check_within_bound(&hf.view(), &got, &o.encode).unwrap();
    }
}

#[test]
fn the_whole_fixture_in_vllm_layout_arrives() {
    let kv = fixture().view().to_layout(Layout::Vllm);
    let l = link(config(FabricKind::Tcp), 16, 1 << 20);
    let o = opts(Level::CgDefault, 128);
    let got = transfer(&l, &kv, &o);
    check_within_bound(&kv.view(), &got, &o.encode).unwrap();
}

#[test]
fn layers_pushed_one_at_a_time_come_out_in_order() {
    let kv = fixture_head(8);
    // Both receivers hand layers out in order: per-layer buffers, and copies out of the
    // cache a whole receiver decodes into.
    for (fabric, whole) in FABRICS.into_iter().flat_map(|f| [(f, false), (f, true)]) {
        let l = link(config(fabric), 4, 1 << 20);
        let o = opts(Level::Raw, 32);
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let mut tx = KvSender::begin(&l.tx, *kv.spec(), &o)?;
                for layer in 0..8 {
                    tx.push_layer(layer, &layer_cache(&kv, layer).view())?;
                }
                tx.finish()
            });
            let mut r = if whole {
                KvReceiver::accept_whole(&l.rx, &l.slots, &recv_opts()).unwrap()
            } else {
                KvReceiver::accept(&l.rx, &l.slots, &recv_opts()).unwrap()
            };
            let es = kv.spec().dtype.size();
            let mut expect = 0;
            while let Some((layer, bytes)) = r.next_layer().unwrap() {
                assert_eq!(layer, expect);
                let range = kv.spec().layer_range(layer);
                assert!(
                    bytes == kv.bytes()[range.start * es..range.end * es],
                    "{fabric:?} (whole: {whole}) layer {layer}"
                );
                expect += 1;
            }
            assert_eq!(expect, 8);
            sender.join().unwrap().unwrap();
        });
    }
}

#[test]
fn a_hundred_back_to_back_transfers_on_one_connection_lose_nothing() {
    let kv = fixture_head(2);
    for fabric in FABRICS {
        let l = link(config(fabric), 4, 1 << 19);
        for i in 0..100 {
            let level = if i % 2 == 0 { Level::Raw } else { Level::CgLow };
            let o = opts(level, 64);
            let got = transfer(&l, &kv, &o);
            if let Err(m) = check_within_bound(&kv.view(), &got, &o.encode) {
                panic!("{fabric:?} transfer {i}: {m}");
            }
        }
    }
}

#[test]
fn eight_concurrent_sessions_lose_nothing() {
    let kv = fixture_head(3);
    for fabric in FABRICS {
        let er = Endpoint::new(config(fabric)).unwrap();
        let es = Endpoint::new(config(fabric)).unwrap();
        let slots = RecvSlots::register(&er, 4, 1 << 20).unwrap();
        let slot_sets: Vec<RecvSlots> = (0..8)
            .map(|i| {
                if i == 0 {
                    slots.clone()
                } else {
                    RecvSlots::register(&er, 4, 1 << 20).unwrap()
                }
            })
            .collect();
        let l = er.listen("127.0.0.1:0").unwrap();
        let addr = l.local_addr();
        std::thread::scope(|s| {
            let mut senders = Vec::new();
            for i in 0..8 {
                let (es, kv) = (&es, &kv);
                senders.push(s.spawn(move || {
                    let c = es.connect(addr).unwrap();
                    let level = Level::ALL[i % Level::ALL.len()];
                    send_kv(&c, &kv.view(), &opts(level, 64)).map(|st| (level, st))
                }));
            }
            let mut receivers = Vec::new();
            for rs in &slot_sets {
                let c = l.accept(Duration::from_secs(10)).unwrap();
                receivers.push(s.spawn(move || {
                    let r = KvReceiver::accept(&c, rs, &recv_opts()).unwrap();
                    let level = r.decoder().header().level;
                    let (got, _) = r.recv_all().unwrap();
                    (level, got)
                }));
            }
            for h in senders {
                h.join().unwrap().unwrap();
            }
            for h in receivers {
                let (level, got) = h.join().unwrap();
                let o = opts(level, 64);
                check_within_bound(&kv.view(), &got, &o.encode)
                    .unwrap_or_else(|m| panic!("{fabric:?} {level:?}: {m}"));
            }
        });
    }
}

#[test]
fn a_corrupt_block_fails_the_transfer_on_both_sides() {
    let kv = fixture_head(1);
    let l = link(config(FabricKind::Tcp), 2, 1 << 20);
    std::thread::scope(|s| {
        // A hand-driven sender: a valid Begin, then a block with one payload bit flipped.
        let sender = s.spawn(|| -> TransportError {
            let enc =
                kvwire_codec::Encoder::new(*kv.spec(), &EncodeOptions::level(Level::CgDefault))
                    .unwrap();
            let mut header = Vec::new();
            enc.write_header(&mut header);
            l.tx.send_msg(&SessionMsg::Begin { header }.to_bytes())
                .unwrap();
            let ready = loop {
                if let Some(Event::Message(m)) = l.tx.poll(Duration::from_secs(5)).unwrap() {
                    if let SessionMsg::Ready {
                        region, slot_size, ..
                    } = SessionMsg::from_bytes(&m).unwrap()
                    {
                        break (region, slot_size);
                    }
                }
            };
            let mut block = Vec::new();
            enc.encode_block(&kv.view(), 0, 0, &mut block).unwrap();
            let n = block.len();
            block[n - 3] ^= 0x10;
            let imm = BlockImm {
                slot: 0,
                layer: 0,
                chunk: 0,
            }
            .pack();
            l.tx.post_write(
                SendBuf::Bytes(block),
                kvwire_transport::RegionId(ready.0),
                0,
                Some(imm),
                0,
            )
            .unwrap();
            loop {
                match l.tx.poll(Duration::from_secs(5)) {
                    Ok(Some(Event::Message(m))) => {
                        if let SessionMsg::Abort { reason } = SessionMsg::from_bytes(&m).unwrap() {
                            return TransportError::RemoteAbort(reason);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return e,
                }
            }
        });
        let r = KvReceiver::accept(&l.rx, &l.slots, &recv_opts()).unwrap();
        let e = r
            .recv_all()
            .expect_err("a corrupt block must fail the receive");
        assert!(
            matches!(
                e,
                TransportError::Block {
                    layer: 0,
                    chunk: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("checksum") || format!("{e:?}").contains("Checksum"),
            "{e:?}"
        );
        let se = sender.join().unwrap();
        assert!(
            matches!(se, TransportError::RemoteAbort(ref m) if m.contains("layer 0, chunk 0")),
            "{se}"
        );
    });
}

#[test]
fn an_oversized_announcement_is_refused_before_allocating() {
    let kv = fixture_head(2);
    let l = link(config(FabricKind::Tcp), 2, 1 << 20);
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_kv(&l.tx, &kv.view(), &opts(Level::Raw, 256)));
        let ro = RecvOptions {
            max_kv_bytes: 1000,
            ..recv_opts()
        };
        let e = KvReceiver::accept(&l.rx, &l.slots, &ro).expect_err("refused");
        assert!(e.to_string().contains("limit is 1000"), "{e}");
        let se = sender.join().unwrap().unwrap_err();
        assert!(matches!(se, TransportError::RemoteAbort(_)), "{se}");
    });
}

#[test]
fn a_block_larger_than_the_slots_is_a_clear_error() {
    let kv = fixture_head(2);
    let l = link(config(FabricKind::Tcp), 2, 4096);
    std::thread::scope(|s| {
        let sender = s.spawn(|| send_kv(&l.tx, &kv.view(), &opts(Level::Raw, 256)));
        let r = KvReceiver::accept(&l.rx, &l.slots, &recv_opts()).unwrap();
        let se = sender.join().unwrap().unwrap_err();
        assert!(se.to_string().contains("slots hold 4096"), "{se}");
        let re = r.recv_all().expect_err("the receiver learns of the abort");
        assert!(matches!(re, TransportError::RemoteAbort(_)), "{re}");
    });
}

#[test]
fn a_receiver_offers_prepare_and_refuses_one_naming_no_level() {
    let kv = fixture_head(1);
    let l = link(config(FabricKind::Tcp), 2, 1 << 20);
    std::thread::scope(|s| {
        // A hand-driven multi-level sender: raw and cg-low, then a Prepare past the list.
        let sender = s.spawn(|| -> (Vec<(u8, u64)>, TransportError) {
            let headers = [Level::Raw, Level::CgLow]
                .iter()
                .map(|&level| {
                    let enc = kvwire_codec::Encoder::new(*kv.spec(), &EncodeOptions::level(level))
                        .unwrap();
                    let mut h = Vec::new();
                    enc.write_header(&mut h);
                    h
                })
                .collect();
            l.tx.send_msg(&SessionMsg::BeginLevels { headers }.to_bytes())
                .unwrap();
            let rates = loop {
                if let Some(Event::Message(m)) = l.tx.poll(Duration::from_secs(5)).unwrap() {
                    if let SessionMsg::ReadyRates { decode_rates, .. } =
                        SessionMsg::from_bytes(&m).unwrap()
                    {
                        break decode_rates;
                    }
                }
            };
            l.tx.send_msg(&SessionMsg::Prepare { index: 9 }.to_bytes())
                .unwrap();
            loop {
                match l.tx.poll(Duration::from_secs(5)) {
                    Ok(Some(Event::Message(m))) => {
                        if let SessionMsg::Abort { reason } = SessionMsg::from_bytes(&m).unwrap() {
                            return (rates, TransportError::RemoteAbort(reason));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return (rates, e),
                }
            }
        });
        let r = KvReceiver::accept(&l.rx, &l.slots, &recv_opts()).unwrap();
        let e = r
            .recv_all()
            .expect_err("a Prepare naming no level must fail");
        assert!(e.to_string().contains("Prepare names level 9 of 2"), "{e}");
        let (rates, se) = sender.join().unwrap();
        // Each level the receiver reports is marked as accepting Prepare.
        assert!(!rates.is_empty());
        for (code, _) in &rates {
            assert!(code & ACCEPTS_PREPARE != 0, "{code:#x}");
            assert!(code & LEVEL_CODE <= Level::CgLow.code(), "{code:#x}");
        }
        assert!(
            matches!(se, TransportError::RemoteAbort(ref m) if m.contains("Prepare names level 9")),
            "{se}"
        );
    });
}
