//! The accept loop and the connection type handed to tonic.
//!
//! Connections are mutual TLS. The one exception is the measurement mode of
//! `[tls] insecure_plaintext_agency`, which serves plaintext HTTP/2 so that
//! the cost of TLS can be measured: every connection acts as the configured
//! agency, and [`Acceptor::plaintext`] refuses a listener whose local address
//! is not loopback.
//!
//! Invariants:
//! - The accept loop only accepts: every handshake runs in its own task under a
//!   timeout, with the server configuration in force when it starts, so a slow or
//!   silent client delays nobody else and a reload never touches an established
//!   connection.
//! - Each connection, from accept until tonic drops it, holds one permit of a
//!   semaphore sized `max_connections`; with none free a new TCP connection is
//!   closed at once. An established connection is registered with the
//!   [`TlsState`] (in plaintext mode, with a registry of its own) until it is
//!   dropped.
//! - An established connection is closed when its certificate is revoked (its
//!   registry token is cancelled) or when it reaches `max_connection_age`: its
//!   next read or write fails with `ConnectionAborted`, which makes hyper tear it
//!   down. Reads register interest in both events, so an idle connection is
//!   closed on time too. Each closure is logged with its reason.
//! - Handshake and accept failures are logged, never fatal to the loop; a failed
//!   handshake is logged at info with a short reason (expired, revoked, ...).
//! - The loop stops when `stop` turns true (or its sender is dropped) or when the
//!   returned stream is dropped; the listener is closed when it stops.
//! - Plaintext is served only on a listener bound to a loopback address.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::either::Either;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn, Instrument};

use super::failure::handshake_failure_reason;
use super::registry::{ConnectionInfo, ConnectionRegistry, Registration};
use super::{IdentityResolver, PeerInfo, TlsError, TlsState};
use crate::config::Config;

/// Established connections waiting for tonic to pick them up.
const READY_QUEUE: usize = 64;
/// Pause after an accept error that is not about one connection (e.g. EMFILE).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Why the broker closed an established connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A reloaded CRL revokes the connection's client certificate.
    CertificateRevoked,
    /// The connection reached `[tls] max_connection_age`.
    MaxAge,
}

impl CloseReason {
    /// Words for logs and the I/O error.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::CertificateRevoked => "its client certificate has been revoked",
            CloseReason::MaxAge => "it reached the maximum connection age",
        }
    }
}

/// Whether `ip` is a loopback address: 127.0.0.0/8 or ::1 (also written as an
/// IPv4-mapped IPv6 address).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// A connection handed to tonic — mutual TLS, or plaintext in the loopback-only
/// measurement mode — carrying the caller's identity resolved once when it was
/// established. Dropping it closes the connection, frees its connection slot
/// and removes it from the registry of live connections.
pub struct Connection {
    inner: Either<TlsStream<TcpStream>, TcpStream>,
    peer: PeerInfo,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    max_age: Pin<Box<Sleep>>,
    closed: Option<CloseReason>,
    _registration: Registration,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    /// The peer's address and identity.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The underlying TLS stream (e.g. for the negotiated protocol); `None`
    /// for a plaintext connection.
    pub fn tls_stream(&self) -> Option<&TlsStream<TcpStream>> {
        match &self.inner {
            Either::Left(tls) => Some(tls),
            Either::Right(_) => None,
        }
    }

    /// Why the connection was closed, once it has been.
    pub fn closed(&self) -> Option<CloseReason> {
        self.closed
    }

    /// Ready with the error to return once the connection must close; else
    /// registers `cx` to be woken when it must.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let reason = match self.closed {
            Some(reason) => reason,
            None => {
                let reason = if self.revoked.as_mut().poll(cx).is_ready() {
                    CloseReason::CertificateRevoked
                } else if self.max_age.as_mut().poll(cx).is_ready() {
                    CloseReason::MaxAge
                } else {
                    return Poll::Pending;
                };
                self.closed = Some(reason);
                info!(
                    peer = %self.peer.remote_addr,
                    agency = self.peer.identity.as_deref().unwrap_or("-"),
                    serial = self.peer.serial.as_deref().unwrap_or("-"),
                    reason = reason.as_str(),
                    "closing connection"
                );
                reason
            }
        };
        Poll::Ready(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("connection closed by the broker: {}", reason.as_str()),
        ))
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("tls", &self.tls_stream().is_some())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(e) = this.poll_close(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Poll::Ready(e) = this.poll_close(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(e) = this.poll_close(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Poll::Ready(e) = this.poll_close(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// Limits of the accept loop.
#[derive(Debug, Clone)]
pub struct AcceptorSettings {
    /// Connections open at once, including those still handshaking. Zero refuses all.
    pub max_connections: usize,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Established connections are closed at this age (`[tls] max_connection_age`).
    pub max_connection_age: Duration,
}

/// What an accepted TCP connection goes through before tonic gets it.
#[derive(Clone)]
enum Transport {
    /// A mutual-TLS handshake with the configuration in force; the agency
    /// comes from the client certificate.
    Tls {
        tls: Arc<TlsState>,
        identities: Arc<IdentityResolver>,
    },
    /// No TLS (loopback only, for measuring what TLS costs): every connection
    /// acts as `agency`. `addr` is the listener's loopback address.
    Plaintext {
        agency: String,
        addr: SocketAddr,
        connections: ConnectionRegistry,
    },
}

/// A bound listener and how its connections are secured, ready to start
/// accepting with [`Acceptor::incoming`].
pub struct Acceptor {
    listener: TcpListener,
    transport: Transport,
}

impl Acceptor {
    /// Mutual TLS: each handshake uses `tls`'s server configuration of the
    /// moment; each connection's agency is resolved by `identities` and the
    /// connection is registered with `tls` (see [`TlsState::reload`]).
    pub fn tls(
        listener: TcpListener,
        tls: Arc<TlsState>,
        identities: Arc<IdentityResolver>,
    ) -> Self {
        Self {
            listener,
            transport: Transport::Tls { tls, identities },
        }
    }

    /// Plaintext HTTP/2 without TLS, every connection acting as `agency`: only
    /// for measuring what TLS costs. Fails unless the listener's local address
    /// is loopback.
    pub fn plaintext(listener: TcpListener, agency: String) -> Result<Self, TlsError> {
        let addr = listener.local_addr().map_err(TlsError::LocalAddr)?;
        if !is_loopback(addr.ip()) {
            return Err(TlsError::PlaintextNotLoopback { addr });
        }
        Ok(Self {
            listener,
            transport: Transport::Plaintext {
                agency,
                addr,
                connections: ConnectionRegistry::default(),
            },
        })
    }

    /// As `config` says: plaintext when `[tls] insecure_plaintext_agency` is
    /// set (see [`Acceptor::plaintext`]), else mutual TLS with the files of
    /// `[tls]` (loaded now) and the configured agencies and `[[identity]]`
    /// mappings.
    pub fn from_config(config: &Config, listener: TcpListener) -> Result<Self, TlsError> {
        match &config.tls.insecure_plaintext_agency {
            Some(agency) => Self::plaintext(listener, agency.clone()),
            None => Ok(Self::tls(
                listener,
                TlsState::load(&config.tls)?,
                Arc::new(IdentityResolver::from_config(config)?),
            )),
        }
    }

    /// The TLS material to reload; `None` in plaintext mode.
    pub fn tls_state(&self) -> Option<&Arc<TlsState>> {
        match &self.transport {
            Transport::Tls { tls, .. } => Some(tls),
            Transport::Plaintext { .. } => None,
        }
    }

    /// Spawns the accept loop and returns the stream of established
    /// connections for `Server::serve_with_incoming_shutdown`.
    ///
    /// Must be called within a Tokio runtime. The loop ends when `stop` becomes
    /// `true` or its sender is dropped, or when the returned stream is dropped;
    /// in-flight handshakes are abandoned then too, so the stream ends promptly.
    pub fn incoming(self, settings: AcceptorSettings, stop: watch::Receiver<bool>) -> Incoming {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        let local = self.listener.local_addr().ok();
        let span = match &self.transport {
            Transport::Tls { .. } => tracing::info_span!("tls_accept", listen = ?local),
            Transport::Plaintext { agency, addr, .. } => {
                warn!(
                    "WARNING: serving PLAINTEXT without TLS on {addr}, every connection acts as \
                     agency {agency} — for measuring TLS cost only"
                );
                tracing::info_span!("plaintext_accept", listen = ?local)
            }
        };
        let accept_loop = AcceptLoop {
            listener: self.listener,
            transport: self.transport,
            permits: Arc::new(Semaphore::new(
                settings.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            settings,
            tx,
            stop,
        };
        tokio::spawn(accept_loop.run().instrument(span));
        Incoming(ReceiverStream::new(rx))
    }
}

/// The established connections of an [`Acceptor`]. It yields only `Ok` items;
/// the error type is what tonic expects.
#[derive(Debug)]
pub struct Incoming(ReceiverStream<Result<Connection, io::Error>>);

impl Stream for Incoming {
    type Item = Result<Connection, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// Mutual-TLS connections on `listener`: [`Acceptor::tls`], then
/// [`Acceptor::incoming`].
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<TlsState>,
    identities: Arc<IdentityResolver>,
    settings: AcceptorSettings,
    stop: watch::Receiver<bool>,
) -> Incoming {
    Acceptor::tls(listener, tls, identities).incoming(settings, stop)
}

struct AcceptLoop {
    listener: TcpListener,
    transport: Transport,
    permits: Arc<Semaphore>,
    settings: AcceptorSettings,
    tx: mpsc::Sender<Result<Connection, io::Error>>,
    stop: watch::Receiver<bool>,
}

impl AcceptLoop {
    async fn run(self) {
        let stop_signal = stopped(self.stop.clone());
        tokio::pin!(stop_signal);
        loop {
            let (tcp, remote_addr) = tokio::select! {
                biased;
                () = &mut stop_signal => break,
                () = self.tx.closed() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) if is_per_connection(&e) => {
                        debug!(error = %e, "accept failed for one connection");
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "accept failed; retrying shortly");
                        tokio::select! {
                            () = &mut stop_signal => break,
                            () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                        }
                    }
                },
            };

            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                warn!(
                    peer = %remote_addr,
                    max_connections = self.settings.max_connections,
                    "connection limit reached; closing new connection"
                );
                drop(tcp);
                continue;
            };
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(peer = %remote_addr, error = %e, "cannot set TCP_NODELAY");
            }

            let span = match &self.transport {
                Transport::Tls { .. } => tracing::debug_span!("tls_handshake", peer = %remote_addr),
                Transport::Plaintext { .. } => {
                    tracing::debug_span!("plaintext_connection", peer = %remote_addr)
                }
            };
            let handshake = Handshake {
                transport: self.transport.clone(),
                timeout: self.settings.handshake_timeout,
                max_age: self.settings.max_connection_age,
                tx: self.tx.clone(),
                stop: self.stop.clone(),
            };
            tokio::spawn(handshake.run(tcp, remote_addr, permit).instrument(span));
        }
        debug!("accept loop stopped");
    }
}

/// Turns one accepted TCP connection into a [`Connection`] for tonic.
struct Handshake {
    transport: Transport,
    timeout: Duration,
    max_age: Duration,
    tx: mpsc::Sender<Result<Connection, io::Error>>,
    stop: watch::Receiver<bool>,
}

/// What establishing a connection yields, before it is handed to tonic.
type Established = (
    Either<TlsStream<TcpStream>, TcpStream>,
    PeerInfo,
    Registration,
    CancellationToken,
);

impl Handshake {
    async fn run(self, tcp: TcpStream, remote_addr: SocketAddr, permit: OwnedSemaphorePermit) {
        let established = match &self.transport {
            Transport::Tls { tls, identities } => self.tls(tls, identities, tcp, remote_addr).await,
            Transport::Plaintext {
                agency,
                connections,
                ..
            } => Some(plaintext(agency, connections, tcp, remote_addr)),
        };
        let Some((inner, peer, registration, revoked)) = established else {
            return;
        };
        let connection = Connection {
            inner,
            peer,
            revoked: Box::pin(revoked.cancelled_owned()),
            max_age: Box::pin(tokio::time::sleep(self.max_age)),
            closed: None,
            _registration: registration,
            _permit: permit,
        };
        // A send error means the server stopped taking connections; dropping the
        // connection closes it and frees the slot.
        let _ = self.tx.send(Ok(connection)).await;
    }

    /// The TLS handshake and the agency of the client certificate; `None` if
    /// the handshake failed (logged), timed out or was abandoned.
    async fn tls(
        &self,
        tls: &TlsState,
        identities: &IdentityResolver,
        tcp: TcpStream,
        remote_addr: SocketAddr,
    ) -> Option<Established> {
        let acceptor = TlsAcceptor::from(tls.server_config());
        let outcome = tokio::select! {
            () = stopped(self.stop.clone()) => return None,
            () = self.tx.closed() => return None,
            outcome = tokio::time::timeout(self.timeout, acceptor.accept(tcp)) => outcome,
        };
        let stream = match outcome {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                log_handshake_failure(remote_addr, &e);
                return None;
            }
            Err(_elapsed) => {
                info!(
                    peer = %remote_addr,
                    timeout = ?self.timeout,
                    "tls handshake timed out"
                );
                return None;
            }
        };

        let (peer, leaf) = PeerInfo::inspect(
            remote_addr,
            stream.get_ref().1.peer_certificates(),
            identities,
        );
        match &peer.identity {
            Ok(agency) => {
                debug!(peer = %remote_addr, agency = %agency, "tls connection established")
            }
            Err(e) => info!(
                peer = %remote_addr,
                reason = %e,
                "tls connection without a usable agency identity; its requests will be refused"
            ),
        }
        let (registration, revoked) = tls.register(ConnectionInfo {
            remote_addr,
            agency: peer.identity.as_ref().ok().cloned(),
            serial: peer.serial.clone(),
            leaf,
        });
        Some((Either::Left(stream), peer, registration, revoked))
    }
}

/// A plaintext connection acting as `agency`, registered with `connections`
/// (its token is never cancelled: there is no certificate to revoke).
fn plaintext(
    agency: &str,
    connections: &ConnectionRegistry,
    tcp: TcpStream,
    remote_addr: SocketAddr,
) -> Established {
    debug!(peer = %remote_addr, agency = %agency, "plaintext connection accepted");
    let peer = PeerInfo {
        remote_addr,
        identity: Ok(agency.to_owned()),
        serial: None,
    };
    let (registration, revoked) = connections.register(ConnectionInfo {
        remote_addr,
        agency: Some(agency.to_owned()),
        serial: None,
        leaf: None,
    });
    (Either::Right(tcp), peer, registration, revoked)
}

/// Logs a failed handshake with its reason. Certificate and protocol problems
/// (rustls errors) are worth an operator's attention; I/O noise is not.
fn log_handshake_failure(remote_addr: SocketAddr, error: &io::Error) {
    let tls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let label = tls_error
        .map(super::failure::handshake_failure_label)
        .unwrap_or("io");
    ::metrics::counter!(crate::metrics::HANDSHAKE_FAILURES, "reason" => label).increment(1);
    match tls_error {
        Some(e) => info!(
            peer = %remote_addr,
            reason = %handshake_failure_reason(e),
            detail = %e,
            "tls handshake failed"
        ),
        None => debug!(peer = %remote_addr, error = %error, "tls handshake failed"),
    }
}

/// Errors about one incoming connection (it went away before we took it).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Resolves once `stop` is true or its sender has gone.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{write_pem, CertificateAuthority, IssuedCert};
    use crate::tls::{crypto_provider, IdentityError};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use std::future::Future;
    use tokio_rustls::TlsConnector;
    use tokio_stream::StreamExt;

    const AGENCY: &str = "council-leeds";
    const WAIT: Duration = Duration::from_secs(5);

    fn cert(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn key(pem: &str) -> PrivateKeyDer<'static> {
        rustls_pemfile::private_key(&mut pem.as_bytes())
            .unwrap()
            .unwrap()
    }

    struct Pki {
        ca: CertificateAuthority,
        tls: Arc<TlsState>,
        files: crate::config::TlsConfig,
        _dir: tempfile::TempDir,
    }

    /// A CA and the TLS state loaded from files.
    fn pki() -> Pki {
        let generated = CertificateAuthority::generate("test CA").unwrap();
        // Issue from a reloaded CA, as the broker does after a restart.
        let ca = CertificateAuthority::load(&generated.cert_pem(), &generated.key_pem()).unwrap();
        let server = ca.issue_server(&["localhost".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = crate::config::TlsConfig {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            ..Default::default()
        };
        write_pem(&files.ca, &ca.cert_pem(), false).unwrap();
        write_pem(&files.cert, &server.cert_pem, false).unwrap();
        write_pem(&files.key, &server.key_pem, true).unwrap();
        let tls = TlsState::load(&files).unwrap();
        Pki {
            ca,
            tls,
            files,
            _dir: dir,
        }
    }

    fn identities() -> Arc<IdentityResolver> {
        Arc::new(IdentityResolver::new([AGENCY.to_string()], &[]).unwrap())
    }

    fn client(ca: &CertificateAuthority, identity: Option<&IssuedCert>) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(cert(&ca.cert_pem())).unwrap();
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(vec![cert(&id.cert_pem)], key(&id.key_pem))
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    struct Server {
        addr: SocketAddr,
        incoming: Pin<Box<dyn Stream<Item = Result<Connection, io::Error>> + Send>>,
        stop: watch::Sender<bool>,
    }

    async fn start(pki: &Pki, settings: AcceptorSettings) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let incoming = tls_incoming(listener, pki.tls.clone(), identities(), settings, stop_rx);
        Server {
            addr,
            incoming: Box::pin(incoming),
            stop,
        }
    }

    fn settings() -> AcceptorSettings {
        AcceptorSettings {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(3600),
        }
    }

    /// Connects and keeps the client side alive; errors are the test's to check.
    async fn connect(
        addr: SocketAddr,
        connector: TlsConnector,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await
    }

    async fn next(server: &mut Server) -> Option<Connection> {
        tokio::time::timeout(WAIT, server.incoming.next())
            .await
            .expect("a connection within the deadline")
            .map(|r| r.unwrap())
    }

    #[tokio::test]
    async fn handshake_yields_the_agency_identity() {
        let pki = pki();
        let mut server = start(&pki, settings()).await;
        let agency = pki.ca.issue_agency(AGENCY).unwrap();
        let client = tokio::spawn(connect(server.addr, client(&pki.ca, Some(&agency))));

        let conn = next(&mut server).await.unwrap();
        assert_eq!(conn.peer().identity.as_deref(), Ok(AGENCY));
        assert_eq!(conn.peer().serial.as_deref(), Some(agency.serial.as_str()));
        assert_eq!(
            conn.tls_stream().unwrap().get_ref().1.alpn_protocol(),
            Some(&b"h2"[..])
        );
        let client = client.await.unwrap().unwrap();
        assert_eq!(
            conn.peer().remote_addr,
            client.get_ref().0.local_addr().unwrap()
        );
        use tonic::transport::server::Connected;
        assert_eq!(conn.connect_info().identity.as_deref(), Ok(AGENCY));
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_refused_and_the_loop_goes_on() {
        let pki = pki();
        let mut server = start(&pki, settings()).await;
        let rogue_ca = CertificateAuthority::generate("rogue CA").unwrap();
        let rogue = rogue_ca.issue_agency(AGENCY).unwrap();
        // The rogue client trusts the real server but presents a rogue certificate.
        let rogue_client = connect(server.addr, client(&pki.ca, Some(&rogue))).await;
        if let Ok(mut stream) = rogue_client {
            // TLS 1.3: the client finishes first; the server's alert arrives on read.
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(WAIT, stream.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
        }

        let good = pki.ca.issue_agency(AGENCY).unwrap();
        let _good_client = tokio::spawn(connect(server.addr, client(&pki.ca, Some(&good))));
        let conn = next(&mut server).await.unwrap();
        assert_eq!(conn.peer().serial.as_deref(), Some(good.serial.as_str()));
        assert_eq!(conn.peer().identity.as_deref(), Ok(AGENCY));
    }

    #[tokio::test]
    async fn client_without_certificate_connects_without_identity() {
        let pki = pki();
        let mut server = start(&pki, settings()).await;
        let _client = tokio::spawn(connect(server.addr, client(&pki.ca, None)));
        let conn = next(&mut server).await.unwrap();
        assert_eq!(conn.peer().identity, Err(IdentityError::NoCertificate));
        assert_eq!(conn.peer().serial, None);
    }

    #[tokio::test]
    async fn unknown_agency_completes_the_handshake_but_has_no_identity() {
        let pki = pki();
        let mut server = start(&pki, settings()).await;
        let stranger = pki.ca.issue_agency("council-york").unwrap();
        let _client = tokio::spawn(connect(server.addr, client(&pki.ca, Some(&stranger))));
        let conn = next(&mut server).await.unwrap();
        assert_eq!(
            conn.peer().identity,
            Err(IdentityError::UnknownAgency("council-york".into()))
        );
    }

    #[tokio::test]
    async fn silent_client_does_not_block_others_and_times_out() {
        let pki = pki();
        let mut server = start(
            &pki,
            AcceptorSettings {
                handshake_timeout: Duration::from_millis(300),
                ..settings()
            },
        )
        .await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();

        let agency = pki.ca.issue_agency(AGENCY).unwrap();
        let _client = tokio::spawn(connect(server.addr, client(&pki.ca, Some(&agency))));
        let conn = next(&mut server).await.unwrap();
        assert_eq!(conn.peer().identity.as_deref(), Ok(AGENCY));

        // The silent client is cut off after the handshake timeout.
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
            .await
            .expect("server closes the silent connection");
        assert!(matches!(read, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_until_a_slot_frees() {
        let pki = pki();
        let mut server = start(
            &pki,
            AcceptorSettings {
                max_connections: 1,
                ..settings()
            },
        )
        .await;
        let agency = pki.ca.issue_agency(AGENCY).unwrap();
        let _first = tokio::spawn(connect(server.addr, client(&pki.ca, Some(&agency))));
        let first = next(&mut server).await.unwrap();

        let refused = connect(server.addr, client(&pki.ca, Some(&agency))).await;
        assert!(refused.is_err(), "second connection must be closed");

        drop(first);
        let _third = tokio::spawn(connect(server.addr, client(&pki.ca, Some(&agency))));
        assert!(next(&mut server).await.is_some());
    }

    /// Reads the server side as hyper would, until it fails or ends.
    async fn drive(mut conn: Connection) -> (io::ErrorKind, Option<CloseReason>) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) => return (io::ErrorKind::UnexpectedEof, conn.closed()),
                Ok(_) => continue,
                Err(e) => return (e.kind(), conn.closed()),
            }
        }
    }

    /// True once the server has closed the client's connection.
    async fn closed_by_server(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn reload_with_a_new_crl_closes_only_connections_of_revoked_certificates() {
        use crate::tls::crl::tests::crl_pem;
        let pki = pki();
        let crl = pki.files.ca.with_file_name("ca.crl");
        std::fs::write(&crl, crl_pem(&pki.ca, "test CA", &[], 3600)).unwrap();
        let files = crate::config::TlsConfig {
            crl: vec![crl.clone()],
            ..pki.files.clone()
        };
        let pki = Pki {
            tls: TlsState::load(&files).unwrap(),
            files,
            ..pki
        };
        let mut server = start(&pki, settings()).await;
        let doomed = pki.ca.issue_agency(AGENCY).unwrap();
        let kept = pki.ca.issue_agency(AGENCY).unwrap();

        let mut clients = Vec::new();
        let mut served = Vec::new();
        for id in [&doomed, &kept] {
            let client = tokio::spawn(connect(server.addr, client(&pki.ca, Some(id))));
            let conn = next(&mut server).await.unwrap();
            served.push(tokio::spawn(drive(conn)));
            clients.push(client.await.unwrap().unwrap());
        }
        assert_eq!(pki.tls.live_connections(), 2);

        std::fs::write(&crl, crl_pem(&pki.ca, "test CA", &[&doomed.serial], 3600)).unwrap();
        let report = pki.tls.reload().unwrap();
        assert_eq!((report.crls, report.revoked, report.closed), (1, 1, 1));

        let kept_server = served.pop().unwrap();
        let doomed_server = served.pop().unwrap();
        let outcome = tokio::time::timeout(WAIT, doomed_server)
            .await
            .expect("the revoked connection is closed")
            .unwrap();
        assert_eq!(
            outcome,
            (
                io::ErrorKind::ConnectionAborted,
                Some(CloseReason::CertificateRevoked)
            )
        );
        assert!(closed_by_server(&mut clients[0]).await);
        eventually(|| async { pki.tls.live_connections() == 1 }).await;
        assert!(!kept_server.is_finished());

        // A new connection with the revoked certificate fails its handshake.
        if let Ok(mut stream) = connect(server.addr, client(&pki.ca, Some(&doomed))).await {
            assert!(closed_by_server(&mut stream).await);
        }
    }

    #[tokio::test]
    async fn idle_connections_are_closed_at_the_maximum_age() {
        let pki = pki();
        let mut server = start(
            &pki,
            AcceptorSettings {
                max_connection_age: Duration::from_millis(300),
                ..settings()
            },
        )
        .await;
        let agency = pki.ca.issue_agency(AGENCY).unwrap();
        let client = tokio::spawn(connect(server.addr, client(&pki.ca, Some(&agency))));
        let conn = next(&mut server).await.unwrap();
        let mut client = client.await.unwrap().unwrap();
        let started = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(WAIT, drive(conn)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(
            outcome,
            (io::ErrorKind::ConnectionAborted, Some(CloseReason::MaxAge))
        );
        assert!(closed_by_server(&mut client).await);
        assert_eq!(pki.tls.live_connections(), 0);
    }

    async fn start_plaintext(settings: AcceptorSettings) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let incoming = Acceptor::plaintext(listener, AGENCY.to_owned())
            .unwrap()
            .incoming(settings, stop_rx);
        Server {
            addr,
            incoming: Box::pin(incoming),
            stop,
        }
    }

    #[tokio::test]
    async fn plaintext_connections_act_as_the_agency_within_the_connection_limit() {
        let mut server = start_plaintext(AcceptorSettings {
            max_connections: 1,
            ..settings()
        })
        .await;
        let client = TcpStream::connect(server.addr).await.unwrap();
        let conn = next(&mut server).await.unwrap();
        assert_eq!(conn.peer().identity.as_deref(), Ok(AGENCY));
        assert_eq!(conn.peer().serial, None);
        assert_eq!(conn.peer().remote_addr, client.local_addr().unwrap());
        assert!(conn.tls_stream().is_none());

        let mut refused = TcpStream::connect(server.addr).await.unwrap();
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(WAIT, refused.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");

        drop(conn);
        let _third = TcpStream::connect(server.addr).await.unwrap();
        assert!(next(&mut server).await.is_some());
    }

    #[tokio::test]
    async fn plaintext_connections_are_closed_at_the_maximum_age() {
        let mut server = start_plaintext(AcceptorSettings {
            max_connection_age: Duration::from_millis(300),
            ..settings()
        })
        .await;
        let _client = TcpStream::connect(server.addr).await.unwrap();
        let conn = next(&mut server).await.unwrap();
        let outcome = tokio::time::timeout(WAIT, drive(conn)).await.unwrap();
        assert_eq!(
            outcome,
            (io::ErrorKind::ConnectionAborted, Some(CloseReason::MaxAge))
        );
    }

    #[tokio::test]
    async fn plaintext_is_refused_on_a_listener_that_is_not_loopback() {
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        match Acceptor::plaintext(listener, AGENCY.to_owned()) {
            Err(TlsError::PlaintextNotLoopback { addr: refused }) => assert_eq!(refused, addr),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("plaintext accepted on {addr}"),
        }
        // Also as the broker builds it from configuration.
        let mut config = crate::config::Config::load_str(
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[[agency]]\nid = \"council-leeds\"\n",
            Vec::new(),
        )
        .unwrap();
        config.tls.insecure_plaintext_agency = Some(AGENCY.to_owned());
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        assert!(matches!(
            Acceptor::from_config(&config, listener),
            Err(TlsError::PlaintextNotLoopback { .. })
        ));
    }

    #[test]
    fn loopback_addresses() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.0.2.1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn stop_ends_the_stream_and_closes_the_listener() {
        let pki = pki();
        let mut server = start(&pki, settings()).await;
        let addr = server.addr;
        server.stop.send(true).unwrap();
        let end = tokio::time::timeout(WAIT, server.incoming.next())
            .await
            .expect("stream ends");
        assert!(end.is_none());
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_stream_stops_the_loop() {
        let pki = pki();
        let server = start(&pki, settings()).await;
        let addr = server.addr;
        drop(server.incoming);
        eventually(|| async move { TcpStream::connect(addr).await.is_err() }).await;
    }

    /// The whole path: tonic serves `tls_incoming`, a real gRPC client over TLS,
    /// and the identity read from request extensions as handlers will.
    #[tokio::test]
    async fn tonic_serves_connections_and_sees_peer_info() {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;

        crate::tls::install_crypto_provider();
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stop_rx) = watch::channel(false);
        let incoming = tls_incoming(
            listener,
            pki.tls.clone(),
            identities(),
            settings(),
            stop_rx.clone(),
        );
        let (_reporter, health) = tonic_health::server::health_reporter();
        let authenticate =
            |request: tonic::Request<()>| match request.extensions().get::<PeerInfo>() {
                Some(PeerInfo {
                    identity: Ok(_), ..
                }) => Ok(request),
                Some(PeerInfo {
                    identity: Err(e), ..
                }) => Err(tonic::Status::unauthenticated(e.to_string())),
                None => Err(tonic::Status::internal("no peer info")),
            };
        let mut shutdown = stop_rx;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tonic::service::InterceptorLayer::new(authenticate))
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                }),
        );

        let channel = |identity: Option<&IssuedCert>| {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pki.ca.cert_pem()))
                .domain_name("localhost");
            if let Some(id) = identity {
                tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
            }
            Channel::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect_timeout(WAIT)
        };
        let request = || HealthCheckRequest {
            service: String::new(),
        };

        let agency = pki.ca.issue_agency(AGENCY).unwrap();
        let mut client = HealthClient::new(channel(Some(&agency)).connect().await.unwrap());
        client.check(request()).await.unwrap();

        let mut anonymous = HealthClient::new(channel(None).connect().await.unwrap());
        let status = anonymous.check(request()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().starts_with("no client certificate"),
            "{status}"
        );

        stop.send(true).unwrap();
        drop((client, anonymous));
        tokio::time::timeout(WAIT, server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }

    async fn eventually<F, Fut>(mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
