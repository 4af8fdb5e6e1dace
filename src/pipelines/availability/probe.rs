//! One check of one site, timed phase by phase in our own code: DNS, TCP connect, TLS, time to first byte,
//! transfer, total, in microseconds, over a fresh connection (no pool, so every check pays and measures
//! every phase). Redirects are followed up to a limit on fresh connections; the phases add up over the hops.
//!
//! Every failure is a result too, with an error class from a fixed list ([`ErrorClass`]) and the phase it
//! failed in. The body is read up to a cap and matched with the `regex` crate (linear time).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Bytes of body read for the regex; the rest is not read.
pub const BODY_CAP: usize = 1 << 20;

/// The phase a check was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Resolving the host name.
    Dns,
    /// The TCP handshake.
    Connect,
    /// The TLS handshake.
    Tls,
    /// Request sent, waiting for the response head.
    Ttfb,
    /// Reading the body.
    Transfer,
}

/// Why a check failed: a fixed list, so dashboards and alerts can group by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The name does not exist.
    DnsNxdomain,
    /// The name exists but has no address.
    DnsNoAnswer,
    /// The resolver did not answer in time.
    DnsTimeout,
    /// Any other resolver failure.
    DnsError,
    /// Nothing listens on the port.
    ConnectRefused,
    /// The TCP handshake did not finish in time.
    ConnectTimeout,
    /// Any other connect failure (unreachable network, ...).
    ConnectError,
    /// The certificate chain does not lead to a trusted root.
    TlsUntrusted,
    /// The certificate has expired (or is not valid yet).
    TlsExpired,
    /// The certificate is not for this host name.
    TlsHostname,
    /// Any other TLS failure.
    TlsError,
    /// The whole check took longer than its timeout.
    Timeout,
    /// The status is outside the accepted range.
    HttpStatus,
    /// The response is not valid HTTP.
    HttpProtocol,
    /// The body does not match the regex.
    BodyMismatch,
    /// More redirects than the limit, or a loop.
    TooManyRedirects,
    /// The URL cannot be checked (no host, unknown scheme, bad redirect target).
    BadUrl,
}

/// What one check found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `up` or `down`.
    pub outcome: String,
    /// Why it is down.
    pub error_class: Option<ErrorClass>,
    /// In which phase it failed.
    pub error_phase: Option<Phase>,
    /// What the error said.
    pub error: Option<String>,
    /// The final response's status.
    pub http_status: Option<u16>,
    /// Whether the body matched the regex (`None`: no regex, or no body read).
    pub regex_matched: Option<bool>,
    /// The URL of the final response (after redirects).
    pub final_url: String,
    /// Redirects followed.
    pub redirects: u32,
    /// Microseconds per phase, summed over the hops.
    pub dns_us: u64,
    /// TCP handshakes.
    pub connect_us: u64,
    /// TLS handshakes.
    pub tls_us: u64,
    /// From request sent to response head.
    pub ttfb_us: u64,
    /// Reading the body.
    pub transfer_us: u64,
    /// The whole check.
    pub total_us: u64,
    /// Body bytes read (at most [`BODY_CAP`]).
    pub body_bytes: u64,
    /// The server certificate's notAfter, epoch ms (the final hop's, over TLS).
    pub cert_not_after_ms: Option<i64>,
}

/// How to check.
#[derive(Clone)]
pub struct Probe {
    /// Resolves host names.
    pub resolver: Arc<hickory_resolver::TokioResolver>,
    /// Trust roots and settings for https.
    pub tls: Arc<rustls::ClientConfig>,
    /// Redirects followed at most.
    pub max_redirects: u32,
}

/// What a site asks of a check.
#[derive(Clone, Debug)]
pub struct Expect {
    /// Accepted statuses, inclusive.
    pub status: (u16, u16),
    /// A regex the body must match.
    pub regex: Option<regex::Regex>,
    /// The whole check's limit.
    pub timeout: Duration,
}

struct Failure {
    class: ErrorClass,
    phase: Option<Phase>,
    error: String,
}

fn fail(class: ErrorClass, phase: Option<Phase>, error: impl std::fmt::Display) -> Failure {
    Failure {
        class,
        phase,
        error: error.to_string(),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A resolver that asks the given name servers (UDP and TCP) and nothing else: `127.0.0.1:5353` for tests.
pub fn resolver_for(servers: &[SocketAddr], timeout: Duration) -> hickory_resolver::TokioResolver {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::proto::xfer::Protocol;
    let mut config = ResolverConfig::new();
    for s in servers {
        config.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 1;
    opts.cache_size = 0;
    let mut builder = hickory_resolver::Resolver::builder_with_config(
        config,
        hickory_resolver::name_server::TokioConnectionProvider::default(),
    );
    *builder.options_mut() = opts;
    builder.build()
}

/// The system's resolver (`/etc/resolv.conf`), without a cache: every check measures its lookup.
pub fn system_resolver() -> Result<hickory_resolver::TokioResolver, String> {
    let mut builder =
        hickory_resolver::Resolver::builder_tokio().map_err(|e| format!("reading the system resolver config: {e}"))?;
    builder.options_mut().cache_size = 0;
    Ok(builder.build())
}

/// TLS trust: the bundled Mozilla roots, plus the PEM certificates in `extra` (a private CA).
pub fn tls_config(extra: &[Vec<u8>]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for pem in extra {
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("a CA file: {e}"))?;
            roots.add(cert).map_err(|e| format!("a CA certificate: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Probe {
    /// Checks `url` once.
    pub async fn check(&self, url: &str, expect: &Expect) -> Outcome {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + expect.timeout;
        let mut out = Outcome {
            final_url: url.to_owned(),
            ..Outcome::default()
        };
        // The phase in progress, for a timeout.
        let mut phase = Phase::Dns;
        let result = tokio::time::timeout_at(deadline, self.hops(url, expect, &mut out, &mut phase)).await;
        out.total_us = us(started.elapsed());
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(f)) => Some(f),
            Err(_) => Some(match phase {
                Phase::Dns => fail(ErrorClass::DnsTimeout, Some(Phase::Dns), "no answer within the timeout"),
                Phase::Connect => fail(
                    ErrorClass::ConnectTimeout,
                    Some(Phase::Connect),
                    "no TCP handshake within the timeout",
                ),
                p => fail(ErrorClass::Timeout, Some(p), "the check exceeded its timeout"),
            }),
        };
        match failure {
            None => out.outcome = "up".into(),
            Some(f) => {
                out.outcome = "down".into();
                out.error_class = Some(f.class);
                out.error_phase = f.phase;
                out.error = Some(f.error);
            }
        }
        out
    }

    async fn hops(&self, url: &str, expect: &Expect, out: &mut Outcome, phase: &mut Phase) -> Result<(), Failure> {
        let mut current: http::Uri = url.parse().map_err(|e| fail(ErrorClass::BadUrl, None, e))?;
        let mut seen = vec![current.to_string()];
        loop {
            let (status, location) = self.hop(&current, expect, out, phase).await?;
            out.final_url = current.to_string();
            out.http_status = Some(status);
            let redirect = (300..400).contains(&status) && status != 304;
            match location.filter(|_| redirect) {
                Some(location) => {
                    let next = resolve_location(&current, &location)
                        .ok_or_else(|| fail(ErrorClass::BadUrl, None, format!("redirect to {location:?}")))?;
                    if out.redirects >= self.max_redirects || seen.contains(&next.to_string()) {
                        return Err(fail(
                            ErrorClass::TooManyRedirects,
                            None,
                            format!("{} redirects, next {next}", out.redirects + 1),
                        ));
                    }
                    out.redirects += 1;
                    seen.push(next.to_string());
                    current = next;
                }
                None => {
                    if !(expect.status.0..=expect.status.1).contains(&status) {
                        return Err(fail(
                            ErrorClass::HttpStatus,
                            None,
                            format!("status {status} outside {}-{}", expect.status.0, expect.status.1),
                        ));
                    }
                    if out.regex_matched == Some(false) {
                        return Err(fail(
                            ErrorClass::BodyMismatch,
                            None,
                            "the body does not match the regex",
                        ));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// One request over a fresh connection: (status, Location).
    async fn hop(
        &self,
        uri: &http::Uri,
        expect: &Expect,
        out: &mut Outcome,
        phase: &mut Phase,
    ) -> Result<(u16, Option<String>), Failure> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(fail(ErrorClass::BadUrl, None, format!("scheme {other:?}"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| fail(ErrorClass::BadUrl, None, "no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });

        *phase = Phase::Dns;
        let t = Instant::now();
        let ip: IpAddr = match host.parse() {
            Ok(ip) => ip,
            Err(_) => {
                let lookup = self.resolver.lookup_ip(host.as_str()).await;
                out.dns_us += us(t.elapsed());
                let lookup = lookup.map_err(|e| dns_failure(&e))?;
                lookup
                    .iter()
                    .next()
                    .ok_or_else(|| fail(ErrorClass::DnsNoAnswer, Some(Phase::Dns), "no address"))?
            }
        };

        *phase = Phase::Connect;
        let t = Instant::now();
        let tcp = TcpStream::connect((ip, port)).await;
        out.connect_us += us(t.elapsed());
        let tcp = tcp.map_err(|e| {
            let class = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ErrorClass::ConnectRefused,
                std::io::ErrorKind::TimedOut => ErrorClass::ConnectTimeout,
                _ => ErrorClass::ConnectError,
            };
            fail(class, Some(Phase::Connect), e)
        })?;
        let _ = tcp.set_nodelay(true);

        let io: Box<dyn Io> = if https {
            *phase = Phase::Tls;
            let t = Instant::now();
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| fail(ErrorClass::BadUrl, Some(Phase::Tls), e))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await;
            out.tls_us += us(t.elapsed());
            let tls = tls.map_err(|e| tls_failure(&e))?;
            out.cert_not_after_ms = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| not_after_ms(c.as_ref()));
            Box::new(tls)
        } else {
            Box::new(tcp)
        };

        *phase = Phase::Ttfb;
        let t = Instant::now();
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| fail(ErrorClass::HttpProtocol, Some(Phase::Ttfb), e))?;
        let driver = tokio::spawn(conn);
        let authority = uri.authority().map_or_else(|| host.clone(), |a| a.as_str().to_owned());
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "tally-checker")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(ErrorClass::BadUrl, None, e))?;
        let response = sender.send_request(request).await;
        out.ttfb_us += us(t.elapsed());
        let response = response.map_err(|e| fail(ErrorClass::HttpProtocol, Some(Phase::Ttfb), e))?;
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);

        *phase = Phase::Transfer;
        let t = Instant::now();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while bytes.len() < BODY_CAP {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let room = BODY_CAP - bytes.len();
                        bytes.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(e)) => {
                    out.transfer_us += us(t.elapsed());
                    return Err(fail(ErrorClass::HttpProtocol, Some(Phase::Transfer), e));
                }
            }
        }
        out.transfer_us += us(t.elapsed());
        out.body_bytes = bytes.len() as u64;
        driver.abort();
        let redirect = (300..400).contains(&status) && location.is_some();
        if !redirect {
            out.regex_matched = expect
                .regex
                .as_ref()
                .map(|re| re.is_match(&String::from_utf8_lossy(&bytes)));
        }
        Ok((status, location))
    }
}

fn dns_failure(e: &hickory_resolver::ResolveError) -> Failure {
    use hickory_resolver::proto::op::ResponseCode;
    use hickory_resolver::proto::ProtoErrorKind;
    let class = match e.proto().map(|p| p.kind()) {
        Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
            if *response_code == ResponseCode::NXDomain {
                ErrorClass::DnsNxdomain
            } else {
                ErrorClass::DnsNoAnswer
            }
        }
        Some(ProtoErrorKind::Timeout) => ErrorClass::DnsTimeout,
        _ if e.to_string().contains("timed out") => ErrorClass::DnsTimeout,
        _ => ErrorClass::DnsError,
    };
    fail(class, Some(Phase::Dns), e)
}

fn tls_failure(e: &std::io::Error) -> Failure {
    use rustls::{CertificateError, Error};
    let class = match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => ErrorClass::TlsUntrusted,
            CertificateError::Expired | CertificateError::NotValidYet => ErrorClass::TlsExpired,
            CertificateError::ExpiredContext { .. } | CertificateError::NotValidYetContext { .. } => {
                ErrorClass::TlsExpired
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                ErrorClass::TlsHostname
            }
            _ => ErrorClass::TlsError,
        },
        _ => ErrorClass::TlsError,
    };
    fail(class, Some(Phase::Tls), e)
}

/// A redirect's target against the URL it came from (absolute, or a path on the same origin).
fn resolve_location(base: &http::Uri, location: &str) -> Option<http::Uri> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().ok();
    }
    let authority = base.authority()?;
    let scheme = base.scheme_str()?;
    let path = if location.starts_with('/') {
        location.to_owned()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}").parse().ok()
}

/// The notAfter of a DER X.509 certificate, epoch ms: Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
/// [0] version?, serial INTEGER, signature SEQUENCE, issuer SEQUENCE, validity SEQUENCE { notBefore,
/// notAfter }, ... } ... }.
pub fn not_after_ms(der: &[u8]) -> Option<i64> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b));
            rest = &rest[n..];
            len
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut fields = tbs;
    let (tag, _, rest) = tlv(fields)?;
    if tag == 0xa0 {
        fields = rest;
    }
    // serial, signature, issuer, then validity.
    for _ in 0..3 {
        fields = tlv(fields)?.2;
    }
    let (_, validity, _) = tlv(fields)?;
    let (_, _, after) = tlv(validity)?;
    let (tag, time, _) = tlv(after)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            // UTCTime YYMMDDHHMMSSZ: 50-99 are 19xx.
            let yy: i32 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let day = i64::from(dataflows::rates::days_from_civil(
        year,
        num(0..2)? as u32,
        num(2..4)? as u32,
    ));
    Some(((day * 24 + num(4..6)?) * 60 + num(6..8)?) * 60_000 + num(8..10)? * 1000)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
    use hickory_resolver::proto::rr::{rdata::A, RData, Record, RecordType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, UdpSocket};

    use super::*;

    /// The views keep a strip cell's error class as an index into the dataflows' list: every class the
    /// checker reports must be on it (else the strip shows `other`).
    #[test]
    fn every_error_class_is_on_the_views_list() {
        use ErrorClass::*;
        let all = [
            DnsNxdomain,
            DnsNoAnswer,
            DnsTimeout,
            DnsError,
            ConnectRefused,
            ConnectTimeout,
            ConnectError,
            TlsUntrusted,
            TlsExpired,
            TlsHostname,
            TlsError,
            Timeout,
            HttpStatus,
            HttpProtocol,
            BodyMismatch,
            TooManyRedirects,
            BadUrl,
        ];
        // Exhaustive: a new class does not compile here until it is in `all` (and on the list).
        let listed = |c: &ErrorClass| match c {
            DnsNxdomain | DnsNoAnswer | DnsTimeout | DnsError | ConnectRefused | ConnectTimeout | ConnectError
            | TlsUntrusted | TlsExpired | TlsHostname | TlsError | Timeout | HttpStatus | HttpProtocol
            | BodyMismatch | TooManyRedirects | BadUrl => true,
        };
        assert!(all.iter().all(listed));
        let names: Vec<String> = all
            .iter()
            .map(|c| serde_json::to_value(c).unwrap().as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, dataflows::availability::ERROR_CLASSES);
        for (i, name) in names.iter().enumerate() {
            let cell = dataflows::availability::Cell50::new(0, dataflows::availability::Outcome::Down, Some(name));
            assert_eq!((cell.class, cell.error_class()), (i as u8 + 1, Some(name.as_str())));
        }
    }

    /// A stub DNS server on loopback: `nx.*` is NXDOMAIN, `empty.*` has no address, `slow.*` is never
    /// answered, every other name is 127.0.0.1.
    async fn stub_dns() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = req.queries().first().cloned() else {
                    continue;
                };
                let name = q.name().to_ascii();
                if name.starts_with("slow.") {
                    continue;
                }
                let mut resp = Message::new();
                resp.set_id(req.id());
                resp.set_message_type(MessageType::Response);
                resp.set_op_code(req.op_code());
                resp.set_recursion_desired(req.recursion_desired());
                resp.set_recursion_available(true);
                resp.add_query(q.clone());
                if name.starts_with("nx.") {
                    resp.set_response_code(ResponseCode::NXDomain);
                } else if !name.starts_with("empty.") && q.query_type() == RecordType::A {
                    resp.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A::new(127, 0, 0, 1))));
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        addr
    }

    /// A loopback HTTP server whose answer per path `respond` writes on the raw stream.
    type Boxed<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

    async fn server<S>(
        respond: fn(String, S) -> Boxed<()>,
        wrap: impl Fn(TcpStream) -> Boxed<Option<S>> + Send + Sync + 'static,
    ) -> u16
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let wrap = Arc::new(wrap);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let wrap = wrap.clone();
                tokio::spawn(async move {
                    let Some(mut s) = wrap(tcp).await else { return };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let path = String::from_utf8_lossy(&head)
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("/")
                        .to_owned();
                    respond(path, s).await;
                });
            }
        });
        port
    }

    use std::future::Future;

    fn plain(tcp: TcpStream) -> Boxed<Option<TcpStream>> {
        Box::pin(async move { Some(tcp) })
    }

    async fn reply<S: AsyncWrite + Unpin>(s: &mut S, status: &str, headers: &str, body: &str) {
        let text = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
            body.len()
        );
        let _ = s.write_all(text.as_bytes()).await;
        let _ = s.shutdown().await;
    }

    fn routes<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(path: String, mut s: S) -> Boxed<()> {
        Box::pin(async move {
            match path.as_str() {
                "/ok" => reply(&mut s, "200 OK", "", "service status: ok").await,
                "/fail" => reply(&mut s, "500 Internal Server Error", "", "boom").await,
                "/a" => reply(&mut s, "302 Found", "Location: /b\r\n", "").await,
                "/b" => reply(&mut s, "301 Moved", "Location: /ok\r\n", "").await,
                "/x" => reply(&mut s, "302 Found", "Location: /y\r\n", "").await,
                "/y" => reply(&mut s, "302 Found", "Location: /x\r\n", "").await,
                "/slow-head" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    reply(&mut s, "200 OK", "", "late").await;
                }
                "/trickle" => {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n")
                        .await;
                    for _ in 0..5 {
                        tokio::time::sleep(Duration::from_millis(60)).await;
                        let _ = s.write_all(b"0123456789").await;
                    }
                    let _ = s.shutdown().await;
                }
                "/hang" => tokio::time::sleep(Duration::from_secs(60)).await,
                _ => reply(&mut s, "404 Not Found", "", "").await,
            }
        })
    }

    async fn probe_with(ca: &[Vec<u8>]) -> Probe {
        let dns = stub_dns().await;
        Probe {
            resolver: Arc::new(resolver_for(&[dns], Duration::from_millis(300))),
            tls: Arc::new(tls_config(ca).expect("TLS config")),
            max_redirects: 5,
        }
    }

    fn expect(regex: Option<&str>) -> Expect {
        Expect {
            status: (200, 299),
            regex: regex.map(|r| regex::Regex::new(r).expect("regex")),
            timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn http_outcomes_phases_and_error_classes() {
        let probe = probe_with(&[]).await;
        let port = server(routes::<TcpStream>, plain).await;
        let url = |host: &str, path: &str| format!("http://{host}:{port}{path}");

        let ok = probe
            .check(&url("site.test", "/ok"), &expect(Some("status: (ok|fine)")))
            .await;
        assert_eq!(
            (ok.outcome.as_str(), ok.http_status, ok.regex_matched),
            ("up", Some(200), Some(true)),
            "{ok:?}"
        );
        assert!(ok.dns_us > 0 && ok.connect_us > 0 && ok.ttfb_us > 0, "{ok:?}");
        assert!(ok.total_us >= ok.dns_us + ok.connect_us + ok.ttfb_us, "{ok:?}");
        assert_eq!(ok.tls_us, 0);

        let mismatch = probe
            .check(&url("site.test", "/ok"), &expect(Some("^maintenance")))
            .await;
        assert_eq!(
            (mismatch.outcome.as_str(), mismatch.error_class, mismatch.regex_matched),
            ("down", Some(ErrorClass::BodyMismatch), Some(false))
        );

        let fail = probe.check(&url("127.0.0.1", "/fail"), &expect(None)).await;
        assert_eq!(
            (fail.error_class, fail.http_status, fail.dns_us),
            (Some(ErrorClass::HttpStatus), Some(500), 0)
        );

        let chain = probe.check(&url("site.test", "/a"), &expect(None)).await;
        assert_eq!((chain.outcome.as_str(), chain.redirects), ("up", 2), "{chain:?}");
        assert_eq!(chain.final_url, url("site.test", "/ok"));

        let looped = probe.check(&url("site.test", "/x"), &expect(None)).await;
        assert_eq!(looped.error_class, Some(ErrorClass::TooManyRedirects), "{looped:?}");

        let slow = probe.check(&url("site.test", "/slow-head"), &expect(None)).await;
        assert_eq!(slow.outcome, "up");
        assert!(slow.ttfb_us >= 300_000, "ttfb covers the wait for the head: {slow:?}");

        let trickle = probe.check(&url("site.test", "/trickle"), &expect(Some("^0123"))).await;
        assert_eq!(
            (trickle.outcome.as_str(), trickle.body_bytes),
            ("up", 50),
            "{trickle:?}"
        );
        assert!(
            trickle.transfer_us >= 250_000,
            "transfer covers the trickled body: {trickle:?}"
        );

        let mut short = expect(None);
        short.timeout = Duration::from_millis(300);
        let hang = probe.check(&url("site.test", "/hang"), &short).await;
        assert_eq!(
            (hang.error_class, hang.error_phase),
            (Some(ErrorClass::Timeout), Some(Phase::Ttfb)),
            "{hang:?}"
        );
        assert!(hang.total_us >= 300_000);

        // Bound but not listening, and held for the test: nothing else can take the port, and it refuses.
        let held = tokio::net::TcpSocket::new_v4().expect("socket");
        held.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let closed = held.local_addr().expect("addr").port();
        let refused = probe.check(&format!("http://127.0.0.1:{closed}/"), &expect(None)).await;
        assert_eq!(
            (refused.error_class, refused.error_phase),
            (Some(ErrorClass::ConnectRefused), Some(Phase::Connect))
        );
        drop(held);

        for (host, class) in [
            ("nx.test", ErrorClass::DnsNxdomain),
            ("empty.test", ErrorClass::DnsNoAnswer),
            ("slow.test", ErrorClass::DnsTimeout),
        ] {
            let r = probe.check(&url(host, "/ok"), &expect(None)).await;
            assert_eq!(
                (r.error_class, r.error_phase),
                (Some(class), Some(Phase::Dns)),
                "{host}: {r:?}"
            );
        }
    }

    struct Certs {
        ca_pem: String,
        good: rustls::ServerConfig,
        expired: rustls::ServerConfig,
        wrong_name: rustls::ServerConfig,
        self_signed: rustls::ServerConfig,
        not_after_ms: i64,
    }

    fn certs() -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "tally test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let server = |names: &[&str], expired: bool, signed: bool| {
            let key = KeyPair::generate().expect("key");
            let mut p =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            } else {
                p.not_before = rcgen::date_time_ymd(2024, 1, 1);
                p.not_after = rcgen::date_time_ymd(2099, 6, 30);
            }
            let cert = if signed {
                p.signed_by(&key, &ca, &ca_key)
            } else {
                p.self_signed(&key)
            }
            .expect("cert");
            let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], der)
                .expect("server config")
        };
        Certs {
            ca_pem: ca.pem(),
            good: server(&["secure.test"], false, true),
            expired: server(&["secure.test"], true, true),
            wrong_name: server(&["other.example"], false, true),
            self_signed: server(&["secure.test"], false, false),
            not_after_ms: i64::from(dataflows::rates::days_from_civil(2099, 6, 30)) * 86_400_000,
        }
    }

    async fn tls_server(config: rustls::ServerConfig) -> u16 {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        server(routes::<tokio_rustls::server::TlsStream<TcpStream>>, move |tcp| {
            let acceptor = acceptor.clone();
            Box::pin(async move { acceptor.accept(tcp).await.ok() })
        })
        .await
    }

    #[tokio::test]
    async fn tls_trusted_untrusted_expired_and_wrong_name() {
        let c = certs();
        let probe = probe_with(&[c.ca_pem.clone().into_bytes()]).await;
        let good = tls_server(c.good).await;
        let ok = probe
            .check(&format!("https://secure.test:{good}/ok"), &expect(Some("ok")))
            .await;
        assert_eq!(ok.outcome, "up", "{ok:?}");
        assert!(ok.tls_us > 0);
        assert_eq!(
            ok.cert_not_after_ms,
            Some(c.not_after_ms),
            "notAfter read from the leaf"
        );
        for (config, class) in [
            (c.expired, ErrorClass::TlsExpired),
            (c.wrong_name, ErrorClass::TlsHostname),
            (c.self_signed, ErrorClass::TlsUntrusted),
        ] {
            let port = tls_server(config).await;
            let r = probe
                .check(&format!("https://secure.test:{port}/ok"), &expect(None))
                .await;
            assert_eq!((r.error_class, r.error_phase), (Some(class), Some(Phase::Tls)), "{r:?}");
        }
        // Without the test CA the good server is untrusted too.
        let bare = probe_with(&[]).await;
        let r = bare
            .check(&format!("https://secure.test:{good}/ok"), &expect(None))
            .await;
        assert_eq!(r.error_class, Some(ErrorClass::TlsUntrusted), "{r:?}");
    }
}
