//! The connection handshake as a state machine: frames in, frames out, no sockets.
//!
//! Both sides send `Hello` at once (magic, protocol version, role, whether a token is
//! configured, a fresh nonce). A version or token-presence mismatch ends it there with a
//! `Close` frame naming the cause, so both sides report the same thing. With a token, each
//! side then proves it knows the token without sending it: `Auth` carries
//! SHA-256(domain ‖ role ‖ token ‖ own nonce ‖ peer nonce), checked in constant time. Then
//! both send `Meta` (their [`EndpointMeta`]), and the acceptor a `Ticket`, the secret with
//! which the connector's extra data streams `Join` the connection.
//!
//! The `Hello` frame (its 32-byte header and 32-byte payload) is fixed for all versions, so
//! any two versions can tell that they differ.

use sha2::{Digest, Sha256};

use super::frame::{CloseCode, FrameHeader, FrameKind};
use crate::error::{Result, TransportError};
use crate::meta::EndpointMeta;
use crate::PROTOCOL_VERSION;

/// Bytes of the `Hello` payload.
pub const HELLO_LEN: usize = 32;
/// Bytes of an `Auth` proof.
pub const PROOF_LEN: usize = 32;
/// Bytes of a ticket.
pub const TICKET_LEN: usize = 16;

/// Most streams one connection may use.
pub const MAX_STREAMS: u16 = 64;

const MAGIC: [u8; 6] = *b"KVWIRE";
const AUTH_DOMAIN: &[u8] = b"kvwire-auth-v1";

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Dialed out.
    Connector,
    /// Accepted.
    Acceptor,
}

impl Role {
    const fn code(self) -> u8 {
        match self {
            Self::Connector => 0,
            Self::Acceptor => 1,
        }
    }
}

/// An encoded frame ready to send: header plus payload.
pub type OutFrame = Vec<u8>;

/// Builds a frame of `kind` with `payload`.
pub fn frame(kind: FrameKind, region: u32, payload: &[u8]) -> OutFrame {
    let mut h = FrameHeader::new(kind);
    h.region = region;
    h.len = payload.len() as u64;
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A close frame with `code` and a reason (truncated to the reason limit on a char boundary).
pub fn close_frame(code: CloseCode, reason: &str) -> OutFrame {
    let mut end = reason.len().min(super::frame::MAX_REASON_LEN as usize);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    frame(FrameKind::Close, code.code(), &reason.as_bytes()[..end])
}

/// What the handshake learned.
#[derive(Debug, Clone)]
pub struct Established {
    /// The peer's metadata.
    pub peer: EndpointMeta,
    /// The ticket extra streams present (chosen by the acceptor).
    pub ticket: [u8; TICKET_LEN],
    /// How many streams the peer's side of the connection opens (the connector's count is
    /// the one that matters).
    pub peer_streams: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAuth,
    AwaitMeta,
    AwaitTicket,
    Done,
    Failed,
}

/// The handshake of one connection.
#[derive(Debug)]
pub struct Handshake {
    role: Role,
    token: Option<Vec<u8>>,
    nonce: [u8; 16],
    peer_nonce: [u8; 16],
    meta: Vec<u8>,
    ticket: [u8; TICKET_LEN],
    peer_meta: Option<EndpointMeta>,
    peer_streams: u16,
    state: State,
    out: Vec<OutFrame>,
}

impl Handshake {
    /// Starts a handshake; `meta` is this endpoint's serialized metadata, `nonce` fresh
    /// randomness, `ticket` (acceptor only) the secret for extra streams, `streams` the
    /// number of streams this side will use.
    pub fn new(
        role: Role,
        token: Option<&[u8]>,
        nonce: [u8; 16],
        meta: Vec<u8>,
        ticket: [u8; TICKET_LEN],
        streams: u16,
    ) -> Self {
        let mut hello = [0u8; HELLO_LEN];
        hello[..6].copy_from_slice(&MAGIC);
        hello[6..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello[8] = role.code();
        hello[9] = u8::from(token.is_some());
        hello[10..12].copy_from_slice(&streams.to_le_bytes());
        hello[16..32].copy_from_slice(&nonce);
        Self {
            role,
            token: token.map(<[u8]>::to_vec),
            nonce,
            peer_nonce: [0; 16],
            meta,
            ticket,
            peer_meta: None,
            peer_streams: 1,
            state: State::AwaitHello,
            out: vec![frame(FrameKind::Hello, 0, &hello)],
        }
    }

    /// The next frame to send, if any. Call after [`Self::new`] and after every
    /// [`Self::handle`], also when `handle` failed (to send the `Close` that explains it).
    pub fn poll_transmit(&mut self) -> Option<OutFrame> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    /// The handshake's result once complete.
    pub fn established(&self) -> Option<Established> {
        (self.state == State::Done).then(|| Established {
            peer: self.peer_meta.clone().expect("Done implies metadata"),
            ticket: self.ticket,
            peer_streams: self.peer_streams,
        })
    }

    fn fail(&mut self, code: CloseCode, err: TransportError) -> TransportError {
        self.state = State::Failed;
        self.out.push(close_frame(code, &err.to_string()));
        err
    }

    fn proof(&self, role: Role, own_nonce: &[u8; 16], peer_nonce: &[u8; 16]) -> [u8; 32] {
        let token = self.token.as_deref().unwrap_or_default();
        let mut h = Sha256::new();
        h.update(AUTH_DOMAIN);
        h.update([role.code()]);
        h.update((token.len() as u64).to_le_bytes());
        h.update(token);
        h.update(own_nonce);
        h.update(peer_nonce);
        h.finalize().into()
    }

    fn after_auth(&mut self) {
        self.out.push(frame(FrameKind::Meta, 0, &self.meta));
        if self.role == Role::Acceptor {
            self.out.push(frame(FrameKind::Ticket, 0, &self.ticket));
        }
        self.state = State::AwaitMeta;
    }

    /// Handles one frame (its header was parsed with [`FrameHeader::parse`], its payload
    /// read in full: handshake payloads are bounded by the header check).
    ///
    /// # Errors
    /// The reason the handshake failed; a `Close` frame saying so is queued for the peer.
    pub fn handle(&mut self, h: &FrameHeader, payload: &[u8]) -> Result<()> {
        if h.kind == FrameKind::Close {
            self.state = State::Failed;
            return Err(close_error(h.region, payload));
        }
        match (self.state, h.kind) {
            (State::AwaitHello, FrameKind::Hello) => self.on_hello(payload),
            (State::AwaitAuth, FrameKind::Auth) => self.on_auth(payload),
            (State::AwaitMeta, FrameKind::Meta) => {
                let meta = match EndpointMeta::from_bytes(payload) {
                    Ok(m) => m,
                    Err(e) => return Err(self.fail(CloseCode::ProtocolViolation, e)),
                };
                self.peer_meta = Some(meta);
                self.state = if self.role == Role::Connector {
                    State::AwaitTicket
                } else {
                    State::Done
                };
                Ok(())
            }
            (State::AwaitTicket, FrameKind::Ticket) if payload.len() == TICKET_LEN => {
                self.ticket.copy_from_slice(payload);
                self.state = State::Done;
                Ok(())
            }
            (s, k) => {
                let e = TransportError::Protocol(format!(
                    "unexpected {k:?} frame during the handshake ({s:?})"
                ));
                Err(self.fail(CloseCode::ProtocolViolation, e))
            }
        }
    }

    fn on_hello(&mut self, p: &[u8]) -> Result<()> {
        if p.len() != HELLO_LEN || p[..6] != MAGIC {
            let e =
                TransportError::Protocol("the peer is not a kvwire endpoint (bad hello)".into());
            return Err(self.fail(CloseCode::ProtocolViolation, e));
        }
        let theirs = u16::from_le_bytes([p[6], p[7]]);
        if theirs != PROTOCOL_VERSION {
            let e = TransportError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs,
            };
            return Err(self.fail(CloseCode::VersionMismatch, e));
        }
        let peer_role = p[8];
        if peer_role == self.role.code() || peer_role > 1 {
            let e = TransportError::Protocol(format!("peer claims role {peer_role}, same as ours"));
            return Err(self.fail(CloseCode::ProtocolViolation, e));
        }
        let peer_has_token = p[9] != 0;
        match (self.token.is_some(), peer_has_token) {
            (true, false) => {
                let e = TransportError::Auth(
                    "this endpoint requires a token and the peer sent none".into(),
                );
                return Err(self.fail(CloseCode::AuthFailed, e));
            }
            (false, true) => {
                let e = TransportError::Auth(
                    "the peer requires a token and this endpoint has none".into(),
                );
                return Err(self.fail(CloseCode::AuthFailed, e));
            }
            _ => {}
        }
        self.peer_streams = u16::from_le_bytes([p[10], p[11]]);
        if self.peer_streams == 0 || self.peer_streams > MAX_STREAMS {
            let e = TransportError::Protocol(format!(
                "peer wants {} streams (1 to {MAX_STREAMS})",
                self.peer_streams
            ));
            return Err(self.fail(CloseCode::ProtocolViolation, e));
        }
        self.peer_nonce.copy_from_slice(&p[16..32]);
        if self.token.is_some() {
            let proof = self.proof(self.role, &self.nonce, &self.peer_nonce);
            self.out.push(frame(FrameKind::Auth, 0, &proof));
            self.state = State::AwaitAuth;
        } else {
            self.after_auth();
        }
        Ok(())
    }

    fn on_auth(&mut self, p: &[u8]) -> Result<()> {
        let peer_role = match self.role {
            Role::Connector => Role::Acceptor,
            Role::Acceptor => Role::Connector,
        };
        let want = self.proof(peer_role, &self.peer_nonce, &self.nonce);
        if !constant_time_eq(&want, p) {
            let e = TransportError::Auth("the peer's token differs from this endpoint's".into());
            return Err(self.fail(CloseCode::AuthFailed, e));
        }
        self.after_auth();
        Ok(())
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The error a received close frame stands for.
pub fn close_error(code: u32, reason: &[u8]) -> TransportError {
    let reason = String::from_utf8_lossy(reason).into_owned();
    match CloseCode::from_code(code) {
        CloseCode::VersionMismatch => {
            TransportError::PeerClosed(format!("version mismatch: {reason}"))
        }
        CloseCode::AuthFailed => TransportError::Auth(format!("the peer refused us: {reason}")),
        CloseCode::Normal => TransportError::PeerClosed(if reason.is_empty() {
            "closed".into()
        } else {
            reason
        }),
        c => TransportError::PeerClosed(format!("{c:?}: {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{Capabilities, FabricKind};

    fn meta() -> Vec<u8> {
        EndpointMeta {
            protocol_version: PROTOCOL_VERSION,
            fabric: FabricKind::Tcp,
            capabilities: Capabilities::default(),
            addrs: vec![],
            regions: vec![],
        }
        .to_bytes()
        .unwrap()
    }

    /// Runs two handshakes against each other in memory; returns each side's outcome.
    fn drive(mut a: Handshake, mut b: Handshake) -> (Result<Established>, Result<Established>) {
        let (mut ra, mut rb): (Option<Result<()>>, Option<Result<()>>) = (None, None);
        for _ in 0..20 {
            let mut moved = false;
            while let Some(f) = a.poll_transmit() {
                moved = true;
                if rb.as_ref().is_none_or(|r| r.is_ok()) {
                    let h = FrameHeader::parse(f[..32].try_into().unwrap()).unwrap();
                    if let Err(e) = b.handle(&h, &f[32..]) {
                        rb = Some(Err(e));
                    }
                }
            }
            while let Some(f) = b.poll_transmit() {
                moved = true;
                if ra.as_ref().is_none_or(|r| r.is_ok()) {
                    let h = FrameHeader::parse(f[..32].try_into().unwrap()).unwrap();
                    if let Err(e) = a.handle(&h, &f[32..]) {
                        ra = Some(Err(e));
                    }
                }
            }
            if !moved {
                break;
            }
        }
        let fin = |hs: &Handshake, r: Option<Result<()>>| match r {
            Some(Err(e)) => Err(e),
            _ => hs
                .established()
                .ok_or(TransportError::Protocol("incomplete".into())),
        };
        (fin(&a, ra), fin(&b, rb))
    }

    fn pair(ta: Option<&[u8]>, tb: Option<&[u8]>) -> (Handshake, Handshake) {
        (
            Handshake::new(Role::Connector, ta, [1; 16], meta(), [0; 16], 3),
            Handshake::new(Role::Acceptor, tb, [2; 16], meta(), [9; 16], 1),
        )
    }

    #[test]
    fn completes_with_and_without_a_token() {
        for t in [None, Some(&b"s3cret"[..])] {
            let (a, b) = pair(t, t);
            let (ra, rb) = drive(a, b);
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert_eq!(ra.ticket, [9; 16]);
            assert_eq!(rb.ticket, [9; 16]);
            assert_eq!(rb.peer_streams, 3);
        }
    }

    #[test]
    fn token_mismatches_fail_on_both_sides_with_a_clear_message() {
        for (ta, tb) in [
            (Some(&b"one"[..]), Some(&b"two"[..])),
            (Some(&b"one"[..]), None),
            (None, Some(&b"two"[..])),
        ] {
            let (a, b) = pair(ta, tb);
            let (ra, rb) = drive(a, b);
            for r in [ra, rb] {
                let e = r.unwrap_err();
                assert!(matches!(e, TransportError::Auth(_)), "{e}");
            }
        }
    }

    #[test]
    fn version_mismatch_is_named_on_both_sides() {
        let (a, mut b) = pair(None, None);
        // Rewrite b's hello as if from version 99.
        let mut hello = b.poll_transmit().unwrap();
        hello[32 + 6..32 + 8].copy_from_slice(&99u16.to_le_bytes());
        b.out.insert(0, hello);
        let (ra, rb) = drive(a, b);
        let ea = ra.unwrap_err().to_string();
        assert!(ea.contains("version 1") && ea.contains("99"), "{ea}");
        let eb = rb.unwrap_err().to_string();
        assert!(eb.contains("version"), "{eb}");
    }

    #[test]
    fn out_of_order_and_garbage_frames_are_refused() {
        let (mut a, _) = pair(None, None);
        let _ = a.poll_transmit();
        let h = FrameHeader::new(FrameKind::Meta);
        assert!(a.handle(&h, &meta()).is_err());
        let close = a.poll_transmit().unwrap();
        assert_eq!(close[0], 0x30);
        let (mut a, _) = pair(None, None);
        let mut h = FrameHeader::new(FrameKind::Hello);
        h.len = 32;
        assert!(a.handle(&h, &[0u8; 32]).is_err());
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
