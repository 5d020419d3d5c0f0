//! Fabric-level behaviour: writes land with their notification after the data, reads come
//! back, messages pass, and every refusal the issue lists is a clear error on both sides.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kvwire_transport::proto::frame::{FrameHeader, FrameKind};
use kvwire_transport::{
    Access, Endpoint, EndpointConfig, Event, FabricKind, RegionSlice, SendBuf, TransportError,
};

use super::{config, pair, FABRICS};

fn next_event(c: &kvwire_transport::Connection) -> Event {
    c.poll(Duration::from_secs(5))
        .unwrap()
        .expect("an event within 5 s")
}

#[test]
fn writes_land_before_their_notification_on_both_fabrics() {
    for fabric in FABRICS {
        let p = pair(config(fabric), 1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
        p.a.post_write(
            SendBuf::Bytes(data.clone()),
            p.region_b.0,
            4096,
            Some(42),
            7,
        )
        .unwrap();
        match next_event(&p.b) {
            Event::Notify(n) => {
                assert_eq!(
                    (n.offset, n.len, n.imm),
                    (4096, data.len() as u64, Some(42))
                );
                let mut got = vec![0u8; data.len()];
                p.region_b.1.read_at(4096, &mut got).unwrap();
                assert!(got == data, "{fabric:?}: payload differs");
            }
            other => panic!("{fabric:?}: {other:?}"),
        }
        match next_event(&p.a) {
            Event::WriteDone { wr_id, buf } => {
                assert_eq!(wr_id, 7);
                assert_eq!(buf.len(), data.len() as u64);
            }
            other => panic!("{fabric:?}: {other:?}"),
        }
    }
}

#[test]
fn writes_from_a_registered_region_and_reads_back() {
    for fabric in FABRICS {
        let p = pair(config(fabric), 1 << 16);
        p.region_a.1.write_at(0, &[0xab; 1000]).unwrap();
        let src = RegionSlice::new(p.region_a.1.clone(), 0, 1000).unwrap();
        p.a.post_write(SendBuf::Region(src), p.region_b.0, 10, None, 1)
            .unwrap();
        assert!(matches!(next_event(&p.b), Event::Notify(n) if n.imm.is_none()));
        assert!(matches!(
            next_event(&p.a),
            Event::WriteDone { wr_id: 1, .. }
        ));
        // Pull it back into another part of a's region with a one-sided read.
        let dst = RegionSlice::new(p.region_a.1.clone(), 5000, 1000).unwrap();
        p.a.post_read(p.region_b.0, 10, dst, 2).unwrap();
        match next_event(&p.a) {
            Event::ReadDone { wr_id: 2, dst } => {
                let mut got = vec![0u8; 1000];
                dst.region.read_at(5000, &mut got).unwrap();
                assert!(got.iter().all(|&b| b == 0xab), "{fabric:?}");
            }
            other => panic!("{fabric:?}: {other:?}"),
        }
    }
}

#[test]
fn many_writes_over_several_streams_all_arrive() {
    let cfg = EndpointConfig {
        streams: 4,
        ..config(FabricKind::Tcp)
    };
    let p = pair(cfg, 1 << 20);
    let n = 500u64;
    let mut posted = 0;
    let mut seen = vec![false; n as usize];
    let mut done = 0;
    while done < n || seen.iter().any(|s| !s) {
        // Keep up to 100 writes in flight (the endpoint allows 256).
        while posted < n && posted - done < 100 {
            let i = posted;
            let v = vec![i as u8; 1000 + i as usize];
            p.a.post_write(SendBuf::Bytes(v), p.region_b.0, i * 2000, Some(i as u32), i)
                .unwrap();
            posted += 1;
        }
        if let Some(ev) = p.b.poll(Duration::from_millis(1)).unwrap() {
            let Event::Notify(nt) = ev else {
                panic!("{ev:?}")
            };
            let i = nt.imm.unwrap() as usize;
            assert!(!seen[i]);
            seen[i] = true;
            let mut got = vec![0u8; 1000 + i];
            p.region_b.1.read_at(nt.offset, &mut got).unwrap();
            assert!(got.iter().all(|&b| b == i as u8));
        }
        if let Some(ev) = p.a.poll(Duration::from_millis(1)).unwrap() {
            assert!(matches!(ev, Event::WriteDone { .. }));
            done += 1;
        }
    }
}

#[test]
fn messages_pass_both_ways() {
    for fabric in FABRICS {
        let p = pair(config(fabric), 4096);
        p.a.send_msg(b"ping").unwrap();
        assert!(matches!(next_event(&p.b), Event::Message(m) if m == b"ping"));
        p.b.send_msg(b"pong").unwrap();
        assert!(matches!(next_event(&p.a), Event::Message(m) if m == b"pong"));
        assert!(p.a.send_msg(&vec![0; (1 << 20) + 1]).is_err());
    }
}

#[test]
fn out_of_region_writes_are_refused_before_sending() {
    for fabric in FABRICS {
        let p = pair(config(fabric), 4096);
        let e =
            p.a.post_write(SendBuf::Bytes(vec![0; 100]), p.region_b.0, 4000, None, 0)
                .unwrap_err();
        assert!(matches!(e, TransportError::OutOfBounds(_)), "{e}");
        // The connection is still usable.
        p.a.post_write(SendBuf::Bytes(vec![1; 96]), p.region_b.0, 4000, None, 1)
            .unwrap();
        assert!(matches!(next_event(&p.b), Event::Notify(_)));
    }
}

/// A raw client that completes the handshake by hand, then sends what a test wants.
fn raw_client(addr: std::net::SocketAddr) -> TcpStream {
    use kvwire_transport::proto::handshake::{Handshake, Role};
    let meta = Endpoint::new(config(FabricKind::Tcp))
        .unwrap()
        .meta()
        .unwrap()
        .to_bytes()
        .unwrap();
    let mut hs = Handshake::new(Role::Connector, None, [3; 16], meta, [0; 16], 1);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        while let Some(f) = hs.poll_transmit() {
            s.write_all(&f).unwrap();
        }
        if hs.established().is_some() {
            return s;
        }
        let mut hb = [0u8; 32];
        s.read_exact(&mut hb).unwrap();
        let h = FrameHeader::parse(&hb).unwrap();
        let mut p = vec![0u8; h.len as usize];
        s.read_exact(&mut p).unwrap();
        hs.handle(&h, &p).unwrap();
    }
}

/// Reads frames until a close frame; returns its reason.
fn read_close(s: &mut TcpStream) -> String {
    loop {
        let mut hb = [0u8; 32];
        s.read_exact(&mut hb).expect("a close frame before EOF");
        let h = FrameHeader::parse(&hb).unwrap();
        let mut p = vec![
            0u8;
            if h.kind.has_payload() {
                h.len as usize
            } else {
                0
            }
        ];
        s.read_exact(&mut p).unwrap();
        if h.kind == FrameKind::Close {
            return String::from_utf8_lossy(&p).into_owned();
        }
    }
}

#[test]
fn a_forged_out_of_bounds_frame_closes_the_connection() {
    let ep = Endpoint::new(config(FabricKind::Tcp)).unwrap();
    let (id, region) = ep.register(4096, Access::ALL).unwrap();
    region.write_at(0, &[0x5a; 4096]).unwrap();
    let l = ep.listen("127.0.0.1:0").unwrap();
    let mut s = raw_client(l.local_addr());
    let server = l.accept(Duration::from_secs(5)).unwrap();
    let h = FrameHeader {
        kind: FrameKind::Write,
        region: id.0,
        offset: 4000,
        len: 200,
        imm: None,
        id: 0,
    };
    s.write_all(&h.to_bytes()).unwrap();
    s.write_all(&[0u8; 200]).unwrap();
    let reason = read_close(&mut s);
    assert!(
        reason.contains("out of bounds") && reason.contains("200 bytes at offset 4000"),
        "{reason}"
    );
    let e = server.poll(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, TransportError::OutOfBounds(_)), "{e}");
    // Not a byte of the region moved.
    let mut got = vec![0u8; 4096];
    region.read_at(0, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
}

#[test]
fn garbage_and_truncated_frames_end_the_connection_without_a_panic() {
    let ep = Endpoint::new(config(FabricKind::Tcp)).unwrap();
    let (id, _) = ep.register(4096, Access::ALL).unwrap();
    let l = ep.listen("127.0.0.1:0").unwrap();
    // Garbage after the handshake.
    let mut s = raw_client(l.local_addr());
    let server = l.accept(Duration::from_secs(5)).unwrap();
    s.write_all(&[0xee; 32]).unwrap();
    assert!(read_close(&mut s).contains("unknown frame kind"));
    assert!(matches!(
        server.poll(Duration::from_secs(5)),
        Err(TransportError::Protocol(_))
    ));
    // A write whose payload stops short, then the socket closes.
    let mut s = raw_client(l.local_addr());
    let server = l.accept(Duration::from_secs(5)).unwrap();
    let h = FrameHeader {
        kind: FrameKind::Write,
        region: id.0,
        offset: 0,
        len: 1000,
        imm: None,
        id: 0,
    };
    s.write_all(&h.to_bytes()).unwrap();
    s.write_all(&[1u8; 10]).unwrap();
    drop(s);
    let e = server.poll(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, TransportError::PeerClosed(_)), "{e}");
    // Garbage instead of a hello: the listener reports the failed handshake.
    let mut s = TcpStream::connect(l.local_addr()).unwrap();
    s.write_all(&[0x01; 64]).unwrap();
    let e = l.accept(Duration::from_secs(5)).unwrap_err();
    assert!(
        e.to_string().contains("not a kvwire endpoint") || e.to_string().contains("protocol"),
        "{e}"
    );
}

fn try_connect(server: EndpointConfig, client: EndpointConfig) -> (TransportError, TransportError) {
    let es = Endpoint::new(server).unwrap();
    let ec = Endpoint::new(client).unwrap();
    let l = es.listen("127.0.0.1:0").unwrap();
    let c = ec
        .connect(l.local_addr())
        .expect_err("the client must fail");
    let s = l
        .accept(Duration::from_secs(5))
        .expect_err("the server must fail");
    (c, s)
}

#[test]
fn wrong_or_missing_tokens_are_refused_on_both_sides() {
    let with = |t: Option<&str>| EndpointConfig {
        token: t.map(|t| t.as_bytes().to_vec()),
        ..config(FabricKind::Tcp)
    };
    for (s, c) in [
        (Some("right"), Some("wrong")),
        (Some("right"), None),
        (None, Some("x")),
    ] {
        let (ce, se) = try_connect(with(s), with(c));
        assert!(matches!(ce, TransportError::Auth(_)), "client: {ce}");
        assert!(matches!(se, TransportError::Auth(_)), "server: {se}");
    }
    // The same token connects.
    let p = pair(with(Some("right")), 4096);
    p.a.send_msg(b"ok").unwrap();
    assert!(matches!(
        p.b.poll(Duration::from_secs(5)).unwrap(),
        Some(Event::Message(_))
    ));
}

#[test]
fn a_fabric_mismatch_is_named_on_both_sides() {
    let (ce, se) = try_connect(config(FabricKind::Shm), config(FabricKind::Tcp));
    for e in [ce, se] {
        let m = e.to_string();
        assert!(
            m.contains("fabric mismatch") && m.contains("shm") && m.contains("tcp"),
            "{m}"
        );
    }
}

#[test]
fn a_version_mismatch_is_named() {
    // A peer speaking version 2: its hello is ours with the version bytes changed.
    use kvwire_transport::proto::handshake::{frame, HELLO_LEN};
    let ep = Endpoint::new(config(FabricKind::Tcp)).unwrap();
    let l = ep.listen("127.0.0.1:0").unwrap();
    let mut s = TcpStream::connect(l.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; HELLO_LEN];
    hello[..6].copy_from_slice(b"KVWIRE");
    hello[6..8].copy_from_slice(&2u16.to_le_bytes());
    hello[10] = 1;
    s.write_all(&frame(FrameKind::Hello, 0, &hello)).unwrap();
    let reason = read_close(&mut s);
    assert!(
        reason.contains("version 1") && reason.contains("speaks 2"),
        "{reason}"
    );
    let e = l.accept(Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(e, TransportError::VersionMismatch { ours: 1, theirs: 2 }),
        "{e}"
    );
}

#[test]
fn a_silent_peer_times_out_and_a_closed_one_is_reported() {
    for fabric in FABRICS {
        let p = pair(config(fabric), 4096);
        let t = Instant::now();
        assert!(p.a.poll(Duration::from_millis(300)).unwrap().is_none());
        assert!(t.elapsed() < Duration::from_secs(2));
        p.b.close("");
        let t = Instant::now();
        let e = loop {
            match p.a.poll(Duration::from_secs(5)) {
                Err(e) => break e,
                Ok(None) => panic!("{fabric:?}: no error within 5 s"),
                Ok(Some(_)) => {}
            }
        };
        assert!(t.elapsed() < Duration::from_secs(5), "{fabric:?}");
        assert!(
            matches!(e, TransportError::PeerClosed(_)),
            "{fabric:?}: {e}"
        );
        assert!(p.a.send_msg(b"x").is_err());
    }
}
