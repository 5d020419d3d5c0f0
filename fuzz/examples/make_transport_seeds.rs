//! Writes seed inputs for the transport targets, built with the transport's own API:
//! frame headers, metadata blobs and session messages (`transport_parsers`), and frame
//! sequences a real connector sends, with and without a token, followed by core operations
//! (`handshake_stream`).
//!
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --example make_transport_seeds -- <dir>`
//! writes `<dir>/transport_parsers/<name>` and `<dir>/handshake_stream/<name>`.

use std::path::Path;

use kvwire_codec::{EncodeOptions, Encoder, KvShape, KvSpec, Level};
use kvwire_fuzz::transport::{
    acceptor, hdr, CoreOps, FrameStream, MODE_FIX_AUTH, MODE_FIX_META, MODE_SKIP_HANDSHAKE,
    MODE_TOKEN, REGION_LEN, SEL_FRAME, SEL_META, SEL_SESSION, TOKEN,
};
use kvwire_fuzz::{DTYPES, LAYOUTS};
use kvwire_transport::meta::{Capabilities, RegionDesc};
use kvwire_transport::proto::frame::{FrameHeader, FrameKind, HEADER_LEN};
use kvwire_transport::proto::handshake::{close_frame, Handshake, Role};
use kvwire_transport::proto::CloseCode;
use kvwire_transport::session::msg::SessionMsg;
use kvwire_transport::{Access, EndpointMeta, FabricKind, RegionId};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn with_sel(sel: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(body);
    v
}

fn connector_meta(regions: usize) -> EndpointMeta {
    EndpointMeta {
        protocol_version: kvwire_transport::PROTOCOL_VERSION,
        fabric: FabricKind::Tcp,
        capabilities: Capabilities(Capabilities::WRITE_IMM | Capabilities::READ),
        addrs: vec!["10.0.0.2:41000".into(), "pid:4242".into()],
        regions: (0..regions)
            .map(|i| RegionDesc {
                id: RegionId(i as u32),
                len: if i == 0 { REGION_LEN as u64 } else { 1 << 20 },
                key: 0x1000 + i as u64,
                access: if i == 1 {
                    Access {
                        remote_write: true,
                        remote_read: false,
                    }
                } else {
                    Access::ALL
                },
                handle: format!("/proc/4242/fd/{}", 5 + i),
            })
            .collect(),
    }
}

/// Runs a connector against the fuzz targets' acceptor in memory; returns the bytes the
/// connector sent, in order (its hello, its proof with a token, its metadata), and checks
/// that the acceptor was established by them.
fn connector_stream(token: bool, meta: &EndpointMeta, streams: u16) -> Vec<u8> {
    let mut c = Handshake::new(
        Role::Connector,
        token.then_some(TOKEN),
        *b"connector-nonce!",
        meta.to_bytes().unwrap(),
        [0; 16],
        streams,
    );
    let mut a = acceptor(token);
    let mut sent = Vec::new();
    for _ in 0..8 {
        let mut moved = false;
        while let Some(f) = c.poll_transmit() {
            moved = true;
            sent.extend_from_slice(&f);
            let h = FrameHeader::parse(f[..HEADER_LEN].try_into().unwrap()).unwrap();
            a.handle(&h, &f[HEADER_LEN..]).unwrap();
        }
        while let Some(f) = a.poll_transmit() {
            moved = true;
            let h = FrameHeader::parse(f[..HEADER_LEN].try_into().unwrap()).unwrap();
            c.handle(&h, &f[HEADER_LEN..]).unwrap();
        }
        if !moved {
            break;
        }
    }
    assert!(a.established().is_some() && c.established().is_some());
    // The fuzz target carves the same frames back out.
    let mut fs = FrameStream::new(&sent);
    let mut n = 0;
    while fs.next_frame().is_some() {
        n += 1;
    }
    assert_eq!(n, if token { 3 } else { 2 });
    sent
}

/// Core operations a connection sees after the handshake: the peer writes into region 0,
/// reads it, sends a message; we write to and read from the peer, it answers, we drain.
fn core_ops() -> Vec<u8> {
    let mut w = hdr(FrameKind::Write, 0, 128, 256, 7);
    w.imm = Some(0x0100_2003);
    let mut o = CoreOps::default();
    o.header(&w)
        .header(&hdr(FrameKind::Read, 0, 0, REGION_LEN as u64, 8))
        .header(&hdr(FrameKind::Msg, 0, 0, 14, 0))
        .start_write(0, 0, 4096, Some(0x0200_1001)) // id 0
        .write_sent(0)
        .header(&hdr(FrameKind::WriteAck, 0, 0, 0, 0))
        .start_write(0, 64, 64, None) // id 1: acked before write_sent
        .header(&hdr(FrameKind::WriteAck, 0, 0, 0, 1))
        .write_sent(1)
        .start_read(0, 512, 1024) // id 2
        .header(&hdr(FrameKind::ReadResp, 0, 0, 1024, 2))
        .start_write(0, 0, 1, None) // id 3
        .write_sent(3)
        .start_read(0, 0, 8) // id 4
        .drain()
        .header(&hdr(FrameKind::Close, CloseCode::Normal.code(), 0, 0, 0));
    o.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).expect("usage: make_transport_seeds <dir>"));

    // transport_parsers: frame headers.
    let mut w = hdr(FrameKind::Write, 3, 4096, 1 << 20, 9);
    w.imm = Some(0xabcd_0123);
    let frames = [
        ("frame-hello", hdr(FrameKind::Hello, 0, 0, 32, 0)),
        ("frame-write-imm", w),
        ("frame-read", hdr(FrameKind::Read, 1, 64, 4096, 10)),
        ("frame-msg", hdr(FrameKind::Msg, 0, 0, 1 << 20, 0)),
        (
            "frame-close",
            hdr(FrameKind::Close, CloseCode::AuthFailed.code(), 0, 40, 0),
        ),
    ];
    for (name, h) in frames {
        write(
            dir,
            "transport_parsers",
            name,
            &with_sel(SEL_FRAME, &h.to_bytes()),
        );
    }
    // Metadata blobs.
    let empty = EndpointMeta {
        addrs: vec![],
        regions: vec![],
        fabric: FabricKind::Shm,
        ..connector_meta(0)
    };
    for (name, m) in [
        ("meta-empty", empty),
        ("meta-2-regions", connector_meta(2)),
        ("meta-acceptor", kvwire_fuzz::transport::acceptor_meta()),
    ] {
        let b = m.to_bytes().unwrap();
        assert_eq!(EndpointMeta::from_bytes(&b).unwrap(), m);
        write(dir, "transport_parsers", name, &with_sel(SEL_META, &b));
    }
    // Session messages; Begin carries a real codec header.
    let spec = KvSpec {
        shape: KvShape::new(2, 2, 40, 8),
        layout: LAYOUTS[0],
        dtype: DTYPES[1],
    };
    let opts = EncodeOptions {
        level: Level::ALL[1],
        chunk_tokens: 16,
        channel_scale_k: false,
    };
    let mut header = Vec::new();
    Encoder::new(spec, &opts).unwrap().write_header(&mut header);
    for (name, m) in [
        ("session-begin", SessionMsg::Begin { header }),
        (
            "session-ready",
            SessionMsg::Ready {
                region: 1,
                slot_size: 1 << 22,
                slots: 16,
            },
        ),
        (
            "session-grant",
            SessionMsg::Grant {
                slots: vec![0, 1, 2, 15, 255],
            },
        ),
        (
            "session-complete",
            SessionMsg::Complete {
                blocks: 12,
                decode_ns: 1_234_567,
            },
        ),
        (
            "session-abort",
            SessionMsg::Abort {
                reason: "block (layer 0, chunk 1) failed to decode: CRC".into(),
            },
        ),
    ] {
        let b = m.to_bytes();
        assert_eq!(SessionMsg::from_bytes(&b).unwrap(), m);
        write(dir, "transport_parsers", name, &with_sel(SEL_SESSION, &b));
    }

    // handshake_stream: a connector's frames, then core operations.
    let seq = |mode: u8, parts: &[&[u8]]| {
        let mut v = vec![mode];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let ops = core_ops();
    let plain = connector_stream(false, &connector_meta(2), 1);
    let tok = connector_stream(true, &connector_meta(1), 4);
    write(dir, "handshake_stream", "hs-plain", &seq(0, &[&plain]));
    write(
        dir,
        "handshake_stream",
        "hs-plain-core",
        &seq(0, &[&plain, &ops]),
    );
    write(
        dir,
        "handshake_stream",
        "hs-token",
        &seq(MODE_TOKEN, &[&tok]),
    );
    write(
        dir,
        "handshake_stream",
        "hs-token-core",
        &seq(MODE_TOKEN | MODE_FIX_AUTH, &[&tok, &ops]),
    );
    // Odd but well-formed peer metadata (a duplicate region id, a region of u64::MAX bytes),
    // with the CRC-fixing bit set so that mutations of it still get through.
    let mut odd = connector_meta(2);
    odd.regions[1].id = RegionId(0);
    odd.regions.push(RegionDesc {
        id: RegionId(7),
        len: u64::MAX,
        key: 7,
        access: Access::ALL,
        handle: String::new(),
    });
    let odd = connector_stream(false, &odd, 64);
    write(
        dir,
        "handshake_stream",
        "hs-odd-meta-core",
        &seq(MODE_FIX_META, &[&odd, &ops]),
    );
    // The peer gives up after its hello: the handshake ends, the rest drives the core.
    let hello_len = HEADER_LEN + 32;
    let close = close_frame(CloseCode::Aborted, "bye");
    write(
        dir,
        "handshake_stream",
        "hs-hello-close-core",
        &seq(0, &[&plain[..hello_len], &close, &ops]),
    );
    write(
        dir,
        "handshake_stream",
        "core-only",
        &seq(MODE_SKIP_HANDSHAKE, &[&ops]),
    );
}
