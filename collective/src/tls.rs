//! Certificates and QUIC endpoints. Every process makes a self-signed certificate at start;
//! trust is by SHA-256 fingerprint of the certificate (pinning), not by a CA: the coordinator's
//! fingerprint travels in the join address, the workers' in `Assign`.

use crate::{CollectiveError, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Endpoint, EndpointConfig, ServerConfig, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub const ALPN: &[u8] = b"lockstep/1";

/// A process's certificate and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    /// Lower-case hex SHA-256 of the certificate's DER bytes.
    pub fingerprint: String,
}

impl Identity {
    pub fn generate() -> Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec!["lockstep".to_string()])
            .map_err(|e| CollectiveError::Tls(format!("generating a certificate: {e}")))?;
        let cert = ck.cert.der().clone();
        let fingerprint = fingerprint(&cert);
        Ok(Self { cert, key: PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()), fingerprint })
    }

    /// Saves the certificate and key (file mode 0600), so a restarted coordinator keeps the
    /// fingerprint its workers pinned. Layout: u32-LE certificate length, certificate DER,
    /// PKCS#8 key DER.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| CollectiveError::Tls(format!("{}: {e}", path.display()));
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io)?;
        let cert = self.cert.as_ref();
        f.write_all(&(cert.len() as u32).to_le_bytes()).map_err(io)?;
        f.write_all(cert).map_err(io)?;
        f.write_all(self.key.secret_pkcs8_der()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Reads an identity written by [`Identity::save`].
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let bad = |m: String| CollectiveError::Tls(format!("{}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let len = bytes.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let Some(len) = len.filter(|&l| bytes.len() > 4 + l) else {
            return Err(bad("not a lockstep identity file (truncated)".into()));
        };
        let cert = CertificateDer::from(bytes[4..4 + len].to_vec());
        let key = PrivatePkcs8KeyDer::from(bytes[4 + len..].to_vec());
        let fingerprint = fingerprint(&cert);
        Ok(Self { cert, key, fingerprint })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

/// ring's provider with AES-128-GCM first: every link encrypts bulk tensors, and on
/// AES-NI hardware AES-128 costs fewer rounds than AES-256 (the default's first choice)
/// at a strength that is still the TLS 1.3 baseline.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let aes128 = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    provider.cipher_suites.retain(|s| s.suite() != aes128.suite());
    provider.cipher_suites.insert(0, aes128);
    Arc::new(provider)
}

/// Handshake signature checks with the crypto provider's algorithms: what both pinning
/// verifiers do once the certificate itself has been accepted.
#[derive(Debug)]
struct SignatureCheck(Arc<CryptoProvider>);

impl SignatureCheck {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts exactly the server certificate with this fingerprint.
#[derive(Debug)]
struct PinnedServer {
    fingerprint: String,
    signatures: SignatureCheck,
    /// The fingerprint a server presented instead of the pinned one.
    mismatch: PinMismatch,
}

/// Where a client configuration records that the server presented a certificate other
/// than the pinned one: a typed answer to "was it the wrong peer?" after a failed connect.
#[derive(Debug, Clone, Default)]
pub struct PinMismatch(Arc<std::sync::Mutex<Option<String>>>);

impl PinMismatch {
    /// The fingerprint the server presented, if it was not the pinned one.
    pub fn presented(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            if let Ok(mut seen) = self.mismatch.0.lock() {
                *seen = Some(got.clone());
            }
            Err(rustls::Error::General(format!(
                "certificate fingerprint mismatch: pinned {}, server presented {got}",
                self.fingerprint
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// The set of client fingerprints a data-plane endpoint accepts; filled in once `Assign`
/// names the peers.
pub type AllowedPeers = Arc<RwLock<HashSet<String>>>;

#[derive(Debug)]
struct PinnedClients {
    allowed: AllowedPeers,
    signatures: SignatureCheck,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        let allowed = self.allowed.read().map_err(|_| rustls::Error::General("peer set poisoned".into()))?;
        if allowed.contains(&got) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("client certificate {got} is not a peer of this group")))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Flow-control windows sized for bulk tensors; GSO off and a high MTU ceiling, which is
/// what takes loopback QUIC from ~3 to >6 Gbit/s. MTU discovery finds the real path MTU
/// (1500 on a veth) from a safe 1200-byte start.
/// The heartbeat: every connection sends a keep-alive each second, and a peer silent for
/// this long is dead (its connection fails, and so does any collective waiting on it).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// The congestion controller of every connection this process opens or accepts.
///
/// BBR is the default. On a link that drops packets at random (a lossy WAN path), Cubic
/// reads every loss as congestion and throughput collapses (measured on a 3-host ring with
/// 20 ms one-way delay and 0.5% loss: 121 examples/s with Cubic against 434 with BBR on
/// mnist-mlp); BBR paces by the measured bandwidth and RTT instead. On clean loopback the
/// two measured alike (`bench allreduce --transport quic`, n = 2, 1–64 MiB: within ±10%
/// run to run), so BBR costs nothing where Cubic would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cubic" => Ok(Self::Cubic),
            "bbr" => Ok(Self::Bbr),
            other => Err(format!("unknown congestion controller {other:?} (expected cubic or bbr)")),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cubic => "cubic",
            Self::Bbr => "bbr",
        })
    }
}

static CONGESTION_BBR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Sets the congestion controller for connections made from now on (process-wide).
pub fn set_congestion(c: Congestion) {
    CONGESTION_BBR.store(c == Congestion::Bbr, std::sync::atomic::Ordering::Relaxed);
}

/// The controller set by [`set_congestion`] (default BBR).
pub fn congestion() -> Congestion {
    if CONGESTION_BBR.load(std::sync::atomic::Ordering::Relaxed) {
        Congestion::Bbr
    } else {
        Congestion::Cubic
    }
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(64 << 20))
        .receive_window(VarInt::from_u32(128 << 20))
        .send_window(256 << 20)
        .send_fairness(false)
        .enable_segmentation_offload(false)
        .max_concurrent_uni_streams(VarInt::from_u32(64))
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(HEARTBEAT_TIMEOUT.try_into().expect("10 s fits a VarInt")));
    // Start with a large congestion window: the links are datacenter/loopback paths, and a
    // step's gradients arrive as one burst after an idle compute phase.
    match congestion() {
        Congestion::Cubic => {
            let mut cubic = quinn::congestion::CubicConfig::default();
            cubic.initial_window(8 << 20);
            t.congestion_controller_factory(Arc::new(cubic));
        }
        Congestion::Bbr => {
            let mut bbr = quinn::congestion::BbrConfig::default();
            bbr.initial_window(8 << 20);
            t.congestion_controller_factory(Arc::new(bbr));
        }
    }
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(65_000);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

fn tls_err(e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Tls(e.to_string())
}

/// Client side: pins the server's fingerprint and presents our own certificate.
pub fn client_config(me: &Identity, server_fingerprint: &str) -> Result<ClientConfig> {
    Ok(pinned_client_config(me, server_fingerprint)?.0)
}

/// `client_config`, with the record of a server that presented another certificate.
pub fn pinned_client_config(me: &Identity, server_fingerprint: &str) -> Result<(ClientConfig, PinMismatch)> {
    let (tls, mismatch) = pinned_rustls_client(me, server_fingerprint)?;
    let mut cfg = ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).map_err(tls_err)?));
    cfg.transport_config(transport());
    Ok((cfg, mismatch))
}

/// The TLS 1.3 client of `pinned_client_config`, for any transport (QUIC, TCP).
pub fn pinned_rustls_client(me: &Identity, server_fingerprint: &str) -> Result<(rustls::ClientConfig, PinMismatch)> {
    let mismatch = PinMismatch::default();
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer {
            fingerprint: server_fingerprint.to_ascii_lowercase(),
            signatures: SignatureCheck(provider),
            mismatch: mismatch.clone(),
        }))
        .with_client_auth_cert(vec![me.cert.clone()], me.key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok((tls, mismatch))
}

/// Server side. With `peers`, only clients whose fingerprint is in the set may connect
/// (data plane); without, any client may (control plane, authenticated by token instead).
pub fn server_config(me: &Identity, peers: Option<AllowedPeers>) -> Result<ServerConfig> {
    let tls = rustls_server(me, peers)?;
    let mut cfg = ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).map_err(tls_err)?));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// The TLS 1.3 server of `server_config`, for any transport (QUIC, TCP).
pub fn rustls_server(me: &Identity, peers: Option<AllowedPeers>) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?;
    let builder = match peers {
        Some(allowed) => {
            builder.with_client_cert_verifier(Arc::new(PinnedClients { allowed, signatures: SignatureCheck(provider) }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(vec![me.cert.clone()], me.key()).map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Socket buffer size: a burst of 64 KiB datagrams overflows the usual 208 KiB default
/// and every overflow is a loss that QUIC must detect and resend.
const SOCKET_BUFFER_BYTES: usize = 32 << 20;

/// A UDP socket with large kernel buffers. Ordinary requests are capped by
/// net.core.{r,w}mem_max; as root SO_*BUFFORCE lifts the cap.
fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let size = SOCKET_BUFFER_BYTES as libc::c_int;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: a valid fd and a c_int option value of the stated size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    if let (Ok(rcv), true) = (socket.recv_buffer_size(), tracing::enabled!(tracing::Level::DEBUG)) {
        tracing::debug!(recv_buffer = rcv, "udp socket");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint bound to `addr` that serves with `server` and can also connect out.
pub fn endpoint(addr: SocketAddr, server: ServerConfig) -> Result<Endpoint> {
    let mut ep_cfg = EndpointConfig::default();
    ep_cfg.max_udp_payload_size(65_527).map_err(tls_err)?;
    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| CollectiveError::Tls("no async runtime".into()))?;
    Endpoint::new(ep_cfg, Some(server), socket, runtime).map_err(CollectiveError::Io)
}

/// Parses `lockstep://HOST:PORT#FINGERPRINT` into (address, fingerprint).
pub fn parse_join_address(s: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        CollectiveError::Protocol(format!("bad join address {s:?}: {why} (expected lockstep://HOST:PORT#SHA256)"))
    };
    let rest = s.strip_prefix("lockstep://").ok_or_else(|| bad("missing lockstep:// scheme"))?;
    let (addr, fp) = rest.split_once('#').ok_or_else(|| bad("missing #fingerprint"))?;
    if fp.len() != 64 || !fp.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad("fingerprint must be 64 hex digits"));
    }
    if addr.is_empty() {
        return Err(bad("missing HOST:PORT"));
    }
    Ok((addr.to_string(), fp.to_ascii_lowercase()))
}

/// Resolves HOST:PORT (names or literal addresses) to the first socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| CollectiveError::Protocol(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| CollectiveError::Protocol(format!("{addr} resolves to no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_address_parsing() {
        let fp = "a".repeat(64);
        assert_eq!(parse_join_address(&format!("lockstep://h:1#{fp}")).unwrap(), ("h:1".into(), fp.clone()));
        assert!(parse_join_address("http://h:1#x").is_err());
        assert!(parse_join_address("lockstep://h:1").is_err());
        assert!(parse_join_address("lockstep://h:1#abc").is_err());
    }
}
