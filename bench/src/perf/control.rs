//! The out-of-band exchange, perftest's socket on port 18515: a TCP connection (kvwire's
//! TCP fabric, one stream) that carries the options, the go-ahead, progress ticks and the
//! client's results as JSON messages. The data moves on a second connection (port + 1) of
//! the fabric under test.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kvwire_transport::{Connection, Endpoint, EndpointConfig, Event, FabricKind};
use serde_json::{json, Value};

use super::options::{Exchanged, FabricChoice};

/// Protocol version of the exchange.
const EXCHANGE_VERSION: u64 = 1;

/// The control connection.
pub(crate) struct Control {
    /// The link.
    pub(crate) conn: Connection,
    /// Longest wait for a message.
    pub(crate) timeout: Duration,
    /// Keeps the endpoint alive with the connection.
    _ep: Endpoint,
}

fn control_endpoint(timeout: Duration) -> Result<Endpoint> {
    let cfg = EndpointConfig {
        timeout,
        streams: 1,
        ..EndpointConfig::new(FabricKind::Tcp)
    };
    Ok(Endpoint::new(cfg)?)
}

impl Control {
    /// Server: waits at most `timeout` for a client on `port`.
    pub(crate) fn accept(port: u16, timeout: Duration) -> Result<Self> {
        let ep = control_endpoint(timeout)?;
        let listener = ep
            .listen(("0.0.0.0", port))
            .with_context(|| format!("listening on port {port}"))?;
        let conn = listener
            .accept(timeout)
            .map_err(|e| anyhow!("no client connected within {timeout:?} ({e})"))?;
        Ok(Self {
            conn,
            timeout,
            _ep: ep,
        })
    }

    /// Client: connects to `addr`.
    pub(crate) fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let ep = control_endpoint(timeout)?;
        let conn = ep
            .connect(addr)
            .with_context(|| format!("connecting to the perf server at {addr}"))?;
        Ok(Self {
            conn,
            timeout,
            _ep: ep,
        })
    }

    /// Sends one JSON message.
    pub(crate) fn send(&self, v: &Value) -> Result<()> {
        self.conn
            .send_msg(v.to_string().as_bytes())
            .context("sending to the peer")?;
        Ok(())
    }

    /// The next message, waiting at most `timeout` (other events are dropped: the control
    /// connection carries none).
    pub(crate) fn recv_within(&self, timeout: Duration) -> Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .conn
                .poll(left)
                .context("the peer's control connection")?
            {
                Some(Event::Message(m)) => {
                    let v: Value = serde_json::from_slice(&m)
                        .context("the peer sent a message that is not JSON")?;
                    return Ok(Some(v));
                }
                Some(_) => {}
                None => return Ok(None),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// The next message; an error after the timeout.
    pub(crate) fn recv(&self, what: &str) -> Result<Value> {
        match self.recv_within(self.timeout)? {
            Some(v) => {
                if let Some(e) = v.get("error").and_then(Value::as_str) {
                    bail!("the peer failed: {e}");
                }
                Ok(v)
            }
            None => bail!("the peer sent no {what} within {:?}", self.timeout),
        }
    }

    /// Both sides: send ours, read theirs, refuse any difference (both sides print it).
    pub(crate) fn exchange(&self, ours: &Exchanged) -> Result<()> {
        self.send(&json!({"kvwire_perf": EXCHANGE_VERSION, "options": ours}))?;
        let v = self.recv("options")?;
        if v.get("kvwire_perf").and_then(Value::as_u64) != Some(EXCHANGE_VERSION) {
            bail!(
                "the peer speaks another kvwire perf exchange version ({})",
                v["kvwire_perf"]
            );
        }
        let theirs: Exchanged = serde_json::from_value(v["options"].clone())
            .context("the peer's options are malformed")?;
        let diffs = ours.mismatches(&theirs);
        if !diffs.is_empty() {
            bail!("options differ from the peer's: {}", diffs.join("; "));
        }
        Ok(())
    }

    /// Tells the peer why we stop (best effort) and closes.
    pub(crate) fn fail(&self, e: &anyhow::Error) {
        let _ = self.send(&json!({"error": format!("{e:#}")}));
        self.conn.close("");
    }
}

/// Resolves `host` (with or without a port: the port is `port`).
pub(crate) fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let with_port = if host.parse::<IpAddr>().is_ok() || !host.contains(':') {
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => SocketAddr::new(IpAddr::V6(v6), port).to_string(),
            _ => format!("{host}:{port}"),
        }
    } else {
        host.to_string()
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} resolves to no address"))
}

/// The fabric for `choice` to a peer at `addr` (`auto`: shm for loopback, else tcp).
pub(crate) fn fabric_for(choice: FabricChoice, peer: IpAddr) -> Result<FabricKind> {
    Ok(match choice {
        FabricChoice::Tcp => FabricKind::Tcp,
        FabricChoice::Shm => FabricKind::Shm,
        FabricChoice::Auto if peer.is_loopback() => FabricKind::Shm,
        FabricChoice::Auto => FabricKind::Tcp,
        FabricChoice::Verbs => FabricKind::Verbs,
    })
}
