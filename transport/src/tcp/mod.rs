//! Connection setup over TCP (the control connection of every fabric, and the data
//! streams of the TCP fabric): dialing, the listener's handshake threads, and extra streams
//! joining their connection by ticket.

pub(crate) mod link;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::endpoint::{Connection, Endpoint, Listener};
use crate::error::{Result, TransportError};
use crate::meta::FabricKind;
use crate::proto::frame::{CloseCode, FrameHeader, FrameKind, HEADER_LEN};
use crate::proto::handshake::{
    close_frame, constant_time_eq, frame, Established, Handshake, Role, TICKET_LEN,
};
use crate::shm::ShmPath;
use link::{DataPath, SocketLink};

fn random16() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| TransportError::io("getrandom", e.into()))?;
    Ok(b)
}

fn set_timeouts(s: &TcpStream, t: Duration) -> Result<()> {
    s.set_read_timeout(Some(t))
        .map_err(|e| TransportError::io("SO_RCVTIMEO", e))?;
    s.set_write_timeout(Some(t))
        .map_err(|e| TransportError::io("SO_SNDTIMEO", e))?;
    s.set_nodelay(true)
        .map_err(|e| TransportError::io("TCP_NODELAY", e))
}

fn read_frame(s: &TcpStream, what: &'static str) -> Result<(FrameHeader, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    let map = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            TransportError::Timeout(s.read_timeout().ok().flatten().unwrap_or_default(), what)
        }
        _ => TransportError::io(what, e),
    };
    (&*s).read_exact(&mut hb).map_err(map)?;
    let h = FrameHeader::parse(&hb)?;
    if !h.kind.has_payload() {
        return Ok((h, Vec::new()));
    }
    // Handshake payloads are bounded by the header check (at most the metadata limit).
    if h.len > crate::meta::MAX_META_LEN as u64 {
        return Err(TransportError::Protocol(format!(
            "{:?} frame of {} bytes during setup",
            h.kind, h.len
        )));
    }
    let mut p = vec![0u8; h.len as usize];
    (&*s).read_exact(&mut p).map_err(map)?;
    Ok((h, p))
}

/// Runs a handshake to completion over `s`; `first` is a frame already read.
fn handshake(
    s: &TcpStream,
    mut hs: Handshake,
    mut first: Option<(FrameHeader, Vec<u8>)>,
) -> Result<Established> {
    loop {
        while let Some(f) = hs.poll_transmit() {
            (&*s)
                .write_all(&f)
                .map_err(|e| TransportError::io("sending a handshake frame", e))?;
        }
        if let Some(est) = hs.established() {
            return Ok(est);
        }
        let (h, p) = match first.take() {
            Some(f) => f,
            None => read_frame(s, "the peer's handshake")?,
        };
        if let Err(e) = hs.handle(&h, &p) {
            while let Some(f) = hs.poll_transmit() {
                let _ = (&*s).write_all(&f);
            }
            return Err(e);
        }
    }
}

/// Refuses a peer of another fabric, on both sides with the same words.
fn check_fabric(s: &TcpStream, ours: FabricKind, est: &Established) -> Result<()> {
    if est.peer.fabric != ours {
        let e = TransportError::FabricMismatch(format!(
            "this endpoint uses {}, the peer {}",
            ours.name(),
            est.peer.fabric.name()
        ));
        let _ = (&*s).write_all(&close_frame(CloseCode::FabricMismatch, &e.to_string()));
        return Err(e);
    }
    Ok(())
}

fn finish(ep: &Endpoint, streams: Vec<TcpStream>, est: Established) -> Result<Connection> {
    let cfg = ep.config();
    let path = match cfg.fabric {
        FabricKind::Shm => DataPath::Shm(ShmPath::setup(&streams[0], &est.peer, cfg.timeout)?),
        #[cfg(feature = "verbs")]
        FabricKind::Verbs => DataPath::Verbs(Arc::new(crate::verbs::VerbsPath::setup(
            &streams[0],
            ep.verbs_device()?,
            ep.regions(),
            &est.peer,
            cfg.max_in_flight,
            cfg.timeout,
        )?)),
        _ => DataPath::Sockets,
    };
    let link = SocketLink::start(
        cfg.fabric,
        est.peer,
        ep.regions().clone(),
        streams,
        cfg.timeout,
        cfg.max_in_flight,
        path,
    )?;
    Ok(link)
}

pub(crate) fn connect(ep: &Endpoint, addr: impl ToSocketAddrs) -> Result<Connection> {
    let cfg = ep.config();
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| TransportError::io("resolving the peer address", e))?
        .collect();
    let mut last = None;
    let mut ctrl = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, cfg.timeout) {
            Ok(s) => {
                ctrl = Some((s, *a));
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some((ctrl, addr)) = ctrl else {
        return Err(TransportError::io(
            "connecting to the peer",
            last.unwrap_or_else(|| std::io::Error::other("no address")),
        ));
    };
    set_timeouts(&ctrl, cfg.timeout)?;
    let streams = if cfg.fabric == FabricKind::Tcp {
        cfg.streams
    } else {
        1
    };
    let hs = Handshake::new(
        Role::Connector,
        cfg.token.as_deref(),
        random16()?,
        ep.meta()?.to_bytes()?,
        [0; TICKET_LEN],
        streams,
    );
    let est = handshake(&ctrl, hs, None)?;
    check_fabric(&ctrl, cfg.fabric, &est)?;
    let mut all = vec![ctrl];
    for i in 1..streams {
        let s = TcpStream::connect_timeout(&addr, cfg.timeout)
            .map_err(|e| TransportError::io("opening a data stream", e))?;
        set_timeouts(&s, cfg.timeout)?;
        let mut h = FrameHeader::new(FrameKind::Join);
        h.id = u32::from(i);
        h.region = u32::from(streams);
        h.len = TICKET_LEN as u64;
        let mut f = h.to_bytes().to_vec();
        f.extend_from_slice(&est.ticket);
        (&s).write_all(&f)
            .map_err(|e| TransportError::io("joining a data stream", e))?;
        all.push(s);
    }
    finish(ep, all, est)
}

/// A connection whose extra streams are still joining.
struct Joining {
    streams: Vec<Option<TcpStream>>,
    since: Instant,
}

type JoinTable = Arc<Mutex<HashMap<[u8; TICKET_LEN], Joining>>>;

/// Longest the accept thread sleeps before it looks at its stop flag.
const POLL_TICK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 50_000_000,
};

pub(crate) fn listen(ep: Endpoint, addr: impl ToSocketAddrs) -> Result<Listener> {
    let l =
        TcpListener::bind(addr).map_err(|e| TransportError::io("binding the listen address", e))?;
    let local = l
        .local_addr()
        .map_err(|e| TransportError::io("getsockname", e))?;
    l.set_nonblocking(true)
        .map_err(|e| TransportError::io("O_NONBLOCK on the listener", e))?;
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let joins: JoinTable = Arc::default();
    thread::Builder::new()
        .name("kvwire-accept".into())
        .spawn(move || {
            while !st.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (ep, tx, joins) = (ep.clone(), tx.clone(), joins.clone());
                        let _ = thread::Builder::new()
                            .name("kvwire-handshake".into())
                            .spawn(move || serve(&ep, s, &tx, &joins));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Sleeps until a peer connects (each stream of a connection is one
                        // accept, so polling on a timer would delay every connection by up
                        // to a tick per stream), or 50 ms to look at the stop flag.
                        let mut fds = [PollFd::new(&l, PollFlags::IN)];
                        let _ = poll(&mut fds, Some(&POLL_TICK));
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
        .map_err(|e| TransportError::io("spawning the accept thread", e))?;
    Ok(Listener {
        addr: local,
        rx,
        stop,
    })
}

/// Handles one accepted socket: a new connection's handshake or an extra stream joining.
fn serve(ep: &Endpoint, s: TcpStream, tx: &Sender<Result<Connection>>, joins: &JoinTable) {
    let cfg = ep.config();
    let r = (|| -> Result<Option<Connection>> {
        s.set_nonblocking(false)
            .map_err(|e| TransportError::io("O_NONBLOCK off", e))?;
        set_timeouts(&s, cfg.timeout)?;
        let (h, p) = read_frame(&s, "the first frame of a peer")?;
        if h.kind == FrameKind::Join {
            join(&s, &h, &p, joins, cfg.timeout)?;
            return Ok(None);
        }
        let ticket = random16()?;
        let hs = Handshake::new(
            Role::Acceptor,
            cfg.token.as_deref(),
            random16()?,
            ep.meta()?.to_bytes()?,
            ticket,
            1,
        );
        let est = handshake(&s, hs, Some((h, p)))?;
        check_fabric(&s, cfg.fabric, &est)?;
        let n = usize::from(est.peer_streams);
        if n > 1 && cfg.fabric != FabricKind::Tcp {
            return Err(TransportError::Protocol(format!(
                "{n} streams over the {} fabric",
                cfg.fabric.name()
            )));
        }
        let mut streams = vec![Some(
            s.try_clone().map_err(|e| TransportError::io("dup", e))?,
        )];
        if n > 1 {
            streams.resize_with(n, || None);
            lock(joins).insert(
                ticket,
                Joining {
                    streams,
                    since: Instant::now(),
                },
            );
            let deadline = Instant::now() + cfg.timeout;
            loop {
                {
                    let mut j = lock(joins);
                    if j.get(&ticket)
                        .is_some_and(|c| c.streams.iter().all(Option::is_some))
                    {
                        streams = j.remove(&ticket).map(|c| c.streams).unwrap_or_default();
                        break;
                    }
                    if Instant::now() >= deadline {
                        j.remove(&ticket);
                        let _ = (&s).write_all(&close_frame(
                            CloseCode::ProtocolViolation,
                            "data streams did not join in time",
                        ));
                        return Err(TransportError::Timeout(
                            cfg.timeout,
                            "the peer's data streams to join",
                        ));
                    }
                    // Forget tickets of connections that never completed.
                    j.retain(|_, c| c.since.elapsed() < cfg.timeout * 2);
                }
                thread::sleep(Duration::from_millis(2));
            }
        }
        let streams: Vec<TcpStream> = streams.into_iter().flatten().collect();
        Ok(Some(finish(ep, streams, est)?))
    })();
    match r {
        Ok(Some(c)) => {
            let _ = tx.send(Ok(c));
        }
        Ok(None) => {}
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    }
}

fn lock(j: &JoinTable) -> std::sync::MutexGuard<'_, HashMap<[u8; TICKET_LEN], Joining>> {
    j.lock().unwrap_or_else(|p| p.into_inner())
}

fn join(
    s: &TcpStream,
    h: &FrameHeader,
    p: &[u8],
    joins: &JoinTable,
    timeout: Duration,
) -> Result<()> {
    let refuse = |why: &str| {
        let _ = (&*s).write_all(&frame(
            FrameKind::Close,
            CloseCode::AuthFailed.code(),
            why.as_bytes(),
        ));
        TransportError::Auth(why.to_string())
    };
    // The connector opens its data streams as soon as it holds the ticket, which can be
    // before the acceptor's handshake thread has filed it: wait for it a little.
    let deadline = Instant::now() + timeout;
    loop {
        {
            let mut j = lock(joins);
            let slot = j
                .iter_mut()
                .find(|(t, _)| constant_time_eq(&t[..], p))
                .map(|(_, c)| c);
            if let Some(c) = slot {
                let idx = h.id as usize;
                if h.region as usize != c.streams.len()
                    || idx == 0
                    || idx >= c.streams.len()
                    || c.streams[idx].is_some()
                {
                    return Err(refuse("a data stream joined with a bad index"));
                }
                c.streams[idx] = Some(s.try_clone().map_err(|e| TransportError::io("dup", e))?);
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(refuse("a data stream presented an unknown ticket"));
        }
        thread::sleep(Duration::from_millis(1));
    }
}
