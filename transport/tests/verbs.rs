//! The verbs layer against a real RDMA stack: soft-RoCE (rxe0 on 192.0.2.1) inside the QEMU
//! guest of `tests/softroce/run-tests`, which sets `KVWIRE_SOFTROCE=1`. Elsewhere the tests
//! that need a device print SKIPPED and pass; the ones that need none run everywhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvwire_transport::verbs::{
    Completion, CompletionKind, DeviceSelector, QpInfo, RcQueuePair, RemoteRegion, VerbsDevice,
    VerbsRegion,
};
use kvwire_transport::{Access, Region, RegionOptions, TransportError};

fn in_guest() -> bool {
    std::env::var_os("KVWIRE_SOFTROCE").is_some()
}

/// rxe0, or `None` (with a SKIPPED line) outside the soft-RoCE guest.
fn device(test: &str) -> Option<Arc<VerbsDevice>> {
    if !in_guest() {
        println!("SKIPPED {test}: needs soft-RoCE (run tests/softroce/run-tests)");
        return None;
    }
    let dev = VerbsDevice::open(&DeviceSelector {
        name: Some("rxe0".into()),
        ..DeviceSelector::default()
    })
    .expect("rxe0 must open inside the soft-RoCE guest");
    Some(dev)
}

fn region(dev: &Arc<VerbsDevice>, len: usize, seed: u8) -> VerbsRegion {
    let r = Arc::new(Region::new(len, RegionOptions::default()).unwrap());
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect();
    r.write_at(0, &data).unwrap();
    dev.register(r, Access::ALL).unwrap()
}

fn remote(r: &VerbsRegion) -> RemoteRegion {
    RemoteRegion {
        addr: r.addr(),
        len: r.len() as u64,
        rkey: r.rkey(),
    }
}

fn bytes(r: &VerbsRegion, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    r.region().read_at(off, &mut v).unwrap();
    v
}

/// Two connected QPs on one device (the loopback rxe does between them what two hosts' NICs do).
fn pair(dev: &Arc<VerbsDevice>) -> (RcQueuePair, RcQueuePair) {
    let a = RcQueuePair::new(dev, 64).unwrap();
    let b = RcQueuePair::new(dev, 64).unwrap();
    // The info crosses the wire as bytes in real use: go through that path.
    let ia = QpInfo::from_bytes(&a.info().to_bytes()).unwrap();
    let ib = QpInfo::from_bytes(&b.info().to_bytes()).unwrap();
    a.connect(&ib).unwrap();
    b.connect(&ia).unwrap();
    (a, b)
}

/// The next completion on `qp`, waiting at most 10 s (TCG is slow), never forever.
fn next(qp: &RcQueuePair) -> Completion {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut got = qp.poll(left).unwrap();
        if let Some(c) = got.pop() {
            assert!(got.is_empty(), "one completion at a time here: {got:?}");
            return c;
        }
        assert!(!left.is_zero(), "no completion within 10 s");
    }
}

#[test]
fn verbs_qp_info_round_trips_and_rejects_garbage() {
    let info = QpInfo {
        qpn: 0x11,
        psn: 0xab_cdef,
        gid: std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0201).octets(),
        lid: 0,
        mtu: 1024,
    };
    assert_eq!(QpInfo::from_bytes(&info.to_bytes()).unwrap(), info);
    assert!(QpInfo::from_bytes(&info.to_bytes()[..29]).is_err());
    let mut b = info.to_bytes();
    b[3] = 1; // QPN beyond 24 bits
    assert!(QpInfo::from_bytes(&b).is_err());
    let mut b = info.to_bytes();
    b[26..30].copy_from_slice(&1000u32.to_le_bytes());
    assert!(QpInfo::from_bytes(&b).is_err());
}

#[test]
fn verbs_missing_device_is_a_clear_error() {
    let sel = DeviceSelector {
        name: Some("no-such-device".into()),
        ..DeviceSelector::default()
    };
    let e = VerbsDevice::open(&sel).unwrap_err().to_string();
    if in_guest() {
        assert!(e.contains("no RDMA device \"no-such-device\""), "{e}");
        assert!(e.contains("rxe0"), "the message lists what is there: {e}");
    } else {
        // This kernel has no RDMA (or no device): the message says so, nothing panics.
        assert!(e.contains("RDMA"), "{e}");
    }
}

#[test]
fn verbs_write_with_immediate_then_read() {
    let Some(dev) = device("verbs_write_with_immediate_then_read") else {
        return;
    };
    assert_eq!(
        dev.gid().to_ipv4_mapped(),
        Some([192, 0, 2, 1].into()),
        "RoCE v2 GID"
    );
    let (a, b) = pair(&dev);
    let src = region(&dev, 4 << 20, 0x5a);
    let dst = region(&dev, 4 << 20, 0xa5);
    let before = bytes(&dst, 0, 4 << 20);
    b.post_recv(77).unwrap();
    a.post_write(
        1,
        (&src, 4096),
        (&remote(&dst), 8192),
        1 << 20,
        Some(0xC0FFEE),
    )
    .unwrap();
    let w = next(&a);
    assert_eq!(
        (w.wr_id, w.kind, w.status.clone()),
        (1, CompletionKind::Write, Ok(()))
    );
    let r = next(&b);
    assert_eq!(r.kind, CompletionKind::RecvImm, "{r:?}");
    assert_eq!((r.wr_id, r.imm, r.byte_len), (77, Some(0xC0FFEE), 1 << 20));
    let after = bytes(&dst, 0, 4 << 20);
    assert!(
        after[8192..][..1 << 20] == bytes(&src, 4096, 1 << 20)[..],
        "payload differs"
    );
    assert!(
        after[..8192] == before[..8192],
        "bytes before the range moved"
    );
    assert!(
        after[8192 + (1 << 20)..] == before[8192 + (1 << 20)..],
        "bytes after it moved"
    );

    // Pull-style: read 64 KiB of the peer's region back into another place of ours.
    a.post_read(2, (&src, 3 << 20), (&remote(&dst), 8192), 64 << 10)
        .unwrap();
    let rd = next(&a);
    assert_eq!(
        (rd.wr_id, rd.kind, rd.status),
        (2, CompletionKind::Read, Ok(()))
    );
    assert!(
        bytes(&src, 3 << 20, 64 << 10) == bytes(&src, 4096, 64 << 10),
        "read differs"
    );
}

#[test]
fn verbs_ranges_are_checked_before_anything_is_posted() {
    let Some(dev) = device("verbs_ranges_are_checked_before_anything_is_posted") else {
        return;
    };
    let (a, _b) = pair(&dev);
    let src = region(&dev, 1 << 20, 1);
    let dst = region(&dev, 1 << 20, 2);
    let rd = remote(&dst);
    for (lo, ro, len) in [
        ((1 << 20) - 10, 0, 11),
        (0, (1 << 20) - 10, 11),
        (u64::MAX - 2, 0, 8),
        (0, u64::MAX, 2),
    ] {
        let e = a
            .post_write(9, (&src, lo), (&rd, ro), len, None)
            .unwrap_err();
        assert!(matches!(e, TransportError::OutOfBounds(_)), "{e}");
    }
    assert!(
        a.poll(Duration::from_millis(200)).unwrap().is_empty(),
        "nothing was posted"
    );
}

#[test]
fn verbs_bad_rkey_completes_with_an_error() {
    let Some(dev) = device("verbs_bad_rkey_completes_with_an_error") else {
        return;
    };
    let (a, _b) = pair(&dev);
    let src = region(&dev, 1 << 20, 3);
    let dst = region(&dev, 1 << 20, 4);
    let mut forged = remote(&dst);
    forged.rkey ^= 0x5555;
    let t0 = Instant::now();
    a.post_write(5, (&src, 0), (&forged, 0), 4096, None)
        .unwrap();
    let c = next(&a);
    assert_eq!(c.wr_id, 5);
    let e = c.status.unwrap_err();
    assert!(e.contains("remote access"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(
        bytes(&dst, 0, 4096) == bytes(&region(&dev, 4096, 4), 0, 4096),
        "dst was written"
    );
}

#[test]
fn verbs_inline_send_lands_in_a_posted_receive() {
    let Some(dev) = device("verbs_inline_send_lands_in_a_posted_receive") else {
        return;
    };
    let (a, b) = pair(&dev);
    let ring = region(&dev, 4096, 0);
    b.post_recv_into(900, (&ring, 64), 32).unwrap();
    a.post_send_inline(8, b"0123456789abcdef0123456789abcdef")
        .unwrap();
    let s = next(&a);
    assert_eq!(
        (s.wr_id, s.kind, s.status),
        (8, CompletionKind::Send, Ok(()))
    );
    let r = next(&b);
    assert_eq!(
        (r.wr_id, r.kind, r.byte_len),
        (900, CompletionKind::Recv, 32),
        "{r:?}"
    );
    assert_eq!(bytes(&ring, 64, 32), b"0123456789abcdef0123456789abcdef");
}
