use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Pass,
    /// Keep connections open but forward nothing (a network stall: the
    /// peers only notice through their own timeouts).
    Stall,
    /// Close every connection and refuse new ones (a crashed server or a
    /// cut cable that the peers notice at once).
    Cut,
}

/// A TCP proxy between a process and PostgreSQL or RabbitMQ that cuts,
/// stalls and restores connections on command, so fault tests never stop
/// the shared servers.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    open: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on an ephemeral local port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, watcher) = watch::channel(ProxyMode::Pass);
        let open = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (counter, refusals, accepts) = (open.clone(), refused.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watcher.borrow() == ProxyMode::Cut {
                    refusals.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                accepts.fetch_add(1, Ordering::SeqCst);
                let (watcher, counter) = (watcher.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    counter.fetch_add(1, Ordering::SeqCst);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // When either direction ends (EOF, error or cut) both
                    // sockets are dropped, closing the connection.
                    tokio::select! {
                        _ = pump(cr, sw, watcher.clone()) => {}
                        _ = pump(sr, cw, watcher) => {}
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { addr, mode, open, refused, accepted, task }
    }

    /// Proxy for the host and port of `url` (a postgres:// or amqp:// URL).
    pub async fn for_url(url: &str) -> Self {
        let parsed = url::Url::parse(url).expect("valid URL");
        let host = parsed.host_str().expect("URL host");
        let port = parsed.port_or_known_default().unwrap_or(match parsed.scheme() {
            "amqp" => 5672,
            _ => 5432,
        });
        let upstream = tokio::net::lookup_host((host, port)).await.expect("resolve").next().expect("an address");
        Self::start(upstream).await
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_through(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).expect("valid URL");
        parsed.set_host(Some("127.0.0.1")).expect("set host");
        parsed.set_port(Some(self.addr.port())).expect("set port");
        parsed.to_string()
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches mode; [`ProxyMode::Cut`] also closes open connections.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// Close everything, refuse new connections.
    pub fn cut(&self) {
        self.set(ProxyMode::Cut);
    }

    /// Hold everything.
    pub fn stall(&self) {
        self.set(ProxyMode::Stall);
    }

    /// Back to normal.
    pub fn restore(&self) {
        self.set(ProxyMode::Pass);
    }

    /// Connection attempts turned away while cut (a sign that clients are
    /// trying to reconnect).
    pub fn refused_connections(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// Connections let through since the proxy started (a count of a
    /// client's reconnects while the server accepts them).
    pub fn accepted_connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.mode.send_replace(ProxyMode::Cut);
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !wait_passing(&mut mode).await {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Bytes already read are delivered unless the proxy is cut meanwhile.
        if !wait_passing(&mut mode).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits while stalled; false when cut (or the proxy is gone).
async fn wait_passing(mode: &mut watch::Receiver<ProxyMode>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Pass => return true,
            ProxyMode::Cut => return false,
            ProxyMode::Stall => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}
