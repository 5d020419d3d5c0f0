//! The verbs fabric end to end, on soft-RoCE inside the QEMU guest (`tests/softroce/run-tests`
//! sets `KVWIRE_SOFTROCE=1` and builds this crate with its `verbs` feature): one-sided writes
//! and reads through `Link`, whole KV transfers (raw bit-exact, lossy within bound), and a
//! receiver that goes away mid-transfer. Outside the guest each test prints SKIPPED.

use std::time::{Duration, Instant};

use kvwire_codec::{EncodeOptions, Level};
use kvwire_tests::{check_within_bound, fixture_head};
use kvwire_transport::session::{
    send_kv, KvReceiver, KvSender, RecvOptions, RecvSlots, SendOptions,
};
use kvwire_transport::verbs::DeviceSelector;
use kvwire_transport::{
    Access, Connection, Endpoint, EndpointConfig, Event, FabricKind, RegionSlice, SendBuf,
};

fn endpoint(test: &str) -> Option<Endpoint> {
    if std::env::var_os("KVWIRE_SOFTROCE").is_none() {
        println!("SKIPPED {test}: needs soft-RoCE (run tests/softroce/run-tests)");
        return None;
    }
    let cfg = EndpointConfig {
        timeout: Duration::from_secs(10),
        ..EndpointConfig::new(FabricKind::Verbs)
    };
    let sel = DeviceSelector {
        name: Some("rxe0".into()),
        ..DeviceSelector::default()
    };
    Some(Endpoint::with_device(cfg, &sel).expect("rxe0 in the guest"))
}

/// Connects `a` to `b` (both on rxe0, the control connection on loopback).
fn connect(a: &Endpoint, b: &Endpoint) -> (Connection, Connection) {
    let l = b.listen("127.0.0.1:0").unwrap();
    let addr = l.local_addr();
    let a = a.clone();
    let t = std::thread::spawn(move || a.connect(addr).unwrap());
    let cb = l.accept(Duration::from_secs(20)).unwrap();
    (t.join().unwrap(), cb)
}

fn next(c: &Connection) -> Event {
    c.poll(Duration::from_secs(20))
        .unwrap()
        .expect("an event within 20 s")
}

#[test]
fn verbs_link_writes_reads_and_messages() {
    let (Some(ea), Some(eb)) = (
        endpoint("verbs_link_writes_reads_and_messages"),
        endpoint("verbs_link_writes_reads_and_messages"),
    ) else {
        return;
    };
    let (ida, ra) = ea.register(1 << 20, Access::ALL).unwrap();
    let (idb, rb) = eb.register(1 << 20, Access::ALL).unwrap();
    let (a, b) = connect(&ea, &eb);
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    a.post_write(SendBuf::Bytes(payload.clone()), idb, 4096, Some(42), 1)
        .unwrap();
    let Event::WriteDone { wr_id: 1, .. } = next(&a) else {
        panic!("expected the write's completion");
    };
    let Event::Notify(n) = next(&b) else {
        panic!("expected a notification")
    };
    assert_eq!(
        (n.region, n.offset, n.len, n.imm),
        (idb, 4096, 100_000, Some(42))
    );
    let mut got = vec![0; payload.len()];
    rb.read_at(4096, &mut got).unwrap();
    assert!(got == payload, "payload differs");

    // From a registered region, zero-copy, no immediate.
    ra.write_at(0, &payload[..5000]).unwrap();
    let src = RegionSlice::new(ra.clone(), 0, 5000).unwrap();
    a.post_write(SendBuf::Region(src), idb, 0, None, 2).unwrap();
    assert!(matches!(next(&a), Event::WriteDone { wr_id: 2, .. }));
    let _ = ida;
    let Event::Notify(n) = next(&b) else {
        panic!("expected a notification")
    };
    assert_eq!((n.offset, n.len, n.imm), (0, 5000, None));

    // Read back what b holds into another part of a's region.
    let dst = RegionSlice::new(ra.clone(), 500_000, 100_000).unwrap();
    a.post_read(idb, 4096, dst, 3).unwrap();
    let Event::ReadDone { wr_id: 3, dst } = next(&a) else {
        panic!("expected the read's completion");
    };
    let mut back = vec![0; 100_000];
    dst.region.read_at(500_000, &mut back).unwrap();
    assert!(back == payload, "read differs");

    // Bounds are checked before anything is posted; messages travel on the control stream.
    assert!(a
        .post_write(SendBuf::Bytes(vec![1; 10]), idb, (1 << 20) - 5, None, 4)
        .is_err());
    b.send_msg(b"hello over tcp").unwrap();
    let Event::Message(m) = next(&a) else {
        panic!("expected a message")
    };
    assert_eq!(m, b"hello over tcp");
}

#[test]
fn verbs_kv_transfers_raw_exact_and_lossy_within_bound() {
    let (Some(er), Some(es)) = (
        endpoint("verbs_kv_transfers_raw_exact_and_lossy_within_bound"),
        endpoint("verbs_kv_transfers_raw_exact_and_lossy_within_bound"),
    ) else {
        return;
    };
    let slots = RecvSlots::register(&er, 8, 1 << 20).unwrap();
    let (tx, rx) = connect(&es, &er);
    let kv = fixture_head(4);
    for level in [Level::Raw, Level::CgDefault] {
        let mut e = EncodeOptions::level(level);
        e.chunk_tokens = 64;
        let o = SendOptions {
            timeout: Duration::from_secs(20),
            ..SendOptions::new(e)
        };
        let ro = RecvOptions {
            timeout: Duration::from_secs(20),
            ..RecvOptions::default()
        };
        let got = std::thread::scope(|s| {
            let sender = s.spawn(|| send_kv(&tx, &kv.view(), &o));
            let got = KvReceiver::accept(&rx, &slots, &ro).and_then(KvReceiver::recv_all);
            sender.join().unwrap().unwrap();
            got.unwrap().0
        });
        check_within_bound(&kv.view(), &got, &o.encode).unwrap();
        if level == Level::Raw {
            assert!(got.bytes() == kv.bytes(), "raw must be bit-exact");
        }
    }
}

#[test]
fn verbs_receiver_gone_mid_transfer_fails_the_sender() {
    let (Some(er), Some(es)) = (
        endpoint("verbs_receiver_gone_mid_transfer_fails_the_sender"),
        endpoint("verbs_receiver_gone_mid_transfer_fails_the_sender"),
    ) else {
        return;
    };
    let slots = RecvSlots::register(&er, 4, 1 << 20).unwrap();
    let (tx, rx) = connect(&es, &er);
    let kv = fixture_head(6);
    let mut one = *kv.spec();
    one.shape.layers = 1;
    let es_ = kv.spec().dtype.size();
    let o = SendOptions {
        timeout: Duration::from_secs(10),
        ..SendOptions::new(EncodeOptions::level(Level::Raw))
    };
    let ro = RecvOptions {
        timeout: Duration::from_secs(10),
        ..RecvOptions::default()
    };
    let t0 = Instant::now();
    let result = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut r = KvReceiver::accept(&rx, &slots, &ro).unwrap();
            let first = r.next_layer().unwrap();
            assert_eq!(first.map(|(l, _)| l), Some(0));
            // The receiving process dies: its connection closes without a word.
            rx.close("receiver gone");
            drop(r);
        });
        let mut sender = KvSender::begin(&tx, *kv.spec(), &o)?;
        for l in 0..kv.spec().shape.layers {
            let r = kv.spec().layer_range(l);
            let view =
                kvwire_codec::KvView::new(one, &kv.bytes()[r.start * es_..r.end * es_]).unwrap();
            sender.push_layer(l, &view)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        let st = sender.finish();
        receiver.join().unwrap();
        st
    });
    assert!(result.is_err(), "the sender must fail: {result:?}");
    assert!(t0.elapsed() < Duration::from_secs(60), "and not hang");
}
