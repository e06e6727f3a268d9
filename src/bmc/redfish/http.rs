//! A small HTTP/1.1 client for one BMC, over rustls.
//!
//! Overview: a BMC is asked one thing at a time (the driver holds a lock around every
//! exchange), over one kept-alive HTTPS connection. A general client keeps per connection
//! what a busy web client needs: reqwest over hyper held, per BMC, an 8 KiB read buffer, an
//! 8 KiB write buffer, a dispatch channel and a connection pool of its own, about 30 KiB a
//! BMC measured with heaptrack, 300 MiB at 10,000 BMCs. Here an idle connection is the TLS
//! state and the socket alone: the buffers of an exchange live while it does.
//!
//! What it does: a connect timeout (TCP and TLS) and a whole-exchange timeout; a
//! Content-Length, chunked or close-delimited body, capped; a head and trailers capped at
//! 64 KiB; the connection kept when the BMC keeps it. A BMC closes idle connections when it
//! likes (its keep-alive timeout, a reboot): a kept connection is looked at before it is used
//! (a non-blocking read: the end of the stream, an error or any stray byte and it is dropped
//! for a new one). If it still fails before any byte of the answer came, an idempotent request
//! (GET, HEAD, PUT, DELETE) is sent once more on a new connection; a POST never is (a reset or
//! a login the BMC may have acted on is not sent twice: the caller reads back instead). Not
//! done: redirects (the answer is returned as it is), proxies, HTTP/2, compression,
//! `Expect: 100-continue`.
//!
//! An absolute URL from the BMC (a session's `Location`) is followed by its path on this
//! BMC's connection: BMCs behind address translation name themselves by an address the
//! appliance cannot reach, and the BMC's trust is pinned to this connection anyway.
//!
//! Key types: [`Client`], [`Response`], [`HttpError`].

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The largest answer head (status line and headers) read.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// Headers of one answer at most.
const MAX_HEADERS: usize = 96;
/// The largest chunk-size or trailer line read.
const MAX_LINE_BYTES: usize = 4 << 10;
/// Bytes asked of the socket at a time.
const READ_CHUNK: usize = 16 << 10;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The BMC's URL is not one this client can use.
    #[error("unusable URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// No TCP connection.
    #[error("{0}")]
    Connect(String),
    /// The TLS handshake failed (an untrusted certificate, a protocol mismatch).
    #[error("{0}")]
    Tls(String),
    /// The connect or the whole exchange took longer than its timeout.
    #[error("timed out")]
    Timeout,
    /// The body is larger than the cap.
    #[error("more than {0} bytes")]
    TooLarge(usize),
    /// What came back is not HTTP/1.x (or a request could not be written safely).
    #[error("{0}")]
    Protocol(String),
    /// The connection broke during the exchange.
    #[error("connection lost: {0}")]
    Io(String),
}

/// An answer. (Its `Debug` names the headers but never shows their values: a login's answer
/// carries the session token.)
pub struct Response {
    /// The status code.
    pub status: u16,
    headers: Vec<(String, String)>,
    /// The body, whole.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl Response {
    /// A header's value (the first, by case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One BMC's HTTPS client.
pub struct Client {
    /// `host[:port]` as the URL gave it (the Host header).
    authority: String,
    host: String,
    port: u16,
    /// The URL's path, without a trailing slash, put before every relative path.
    prefix: String,
    name: ServerName<'static>,
    tls: TlsConnector,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// The kept-alive connection between exchanges.
    idle: Mutex<Option<TlsStream<TcpStream>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("authority", &self.authority)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A failed exchange, and whether it failed before any byte of the answer (so that on a
/// reused connection the BMC may simply have closed it while idle).
struct Failure {
    before_answer: bool,
    error: HttpError,
}

impl Failure {
    fn early(error: HttpError) -> Self {
        Self {
            before_answer: true,
            error,
        }
    }
    fn late(error: HttpError) -> Self {
        Self {
            before_answer: false,
            error,
        }
    }
}

fn io_text(e: &std::io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}

/// The HTTP `Authorization` value of Basic authentication.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Splits `https://host[:port][/prefix]`.
fn split_url(url: &str) -> Result<(String, String, u16, String), HttpError> {
    let shown = if url.contains('@') {
        "(a URL with credentials in it, not shown)".to_string()
    } else {
        url.to_string()
    };
    let bad = |reason| HttpError::Url {
        url: shown.clone(),
        reason,
    };
    let rest = url
        .get(..8)
        .filter(|s| s.eq_ignore_ascii_case("https://"))
        .map(|_| &url[8..])
        .ok_or_else(|| bad("a BMC is reached over https:// only"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("no host, or credentials in the URL"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6.find(']').ok_or_else(|| bad("unclosed [ in the host"))?;
        let port = match &v6[end + 1..] {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("bad port"))?),
        };
        (v6[..end].to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
        None => 443,
    };
    if path.contains(['?', '#']) || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("a query, fragment or space in the base path"));
    }
    Ok((
        authority.to_string(),
        host,
        port,
        path.trim_end_matches('/').to_string(),
    ))
}

/// Finds `\r\n` in `buf` from `from`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

impl Client {
    /// A client for the BMC at `url` (`https://host[:port]`), trusting what `tls` trusts.
    pub fn new(
        url: &str,
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, HttpError> {
        let (authority, host, port, prefix) = split_url(url)?;
        let name = ServerName::try_from(host.clone()).map_err(|_| HttpError::Url {
            url: url.to_string(),
            reason: "the host is neither an IP address nor a DNS name",
        })?;
        Ok(Self {
            authority,
            host,
            port,
            prefix,
            name,
            tls: TlsConnector::from(Arc::new(tls)),
            connect_timeout,
            request_timeout,
            idle: Mutex::new(None),
        })
    }

    /// The path a target names on this BMC: a relative path after the base URL's, an
    /// absolute URL's own path (see the module's header).
    fn path_of(&self, target: &str) -> Result<String, HttpError> {
        if target.starts_with('/') {
            return Ok(format!("{}{target}", self.prefix));
        }
        let Some((_, after_scheme)) = target.split_once("://") else {
            // A relative reference (`Sessions/1`) would need the request's path to resolve:
            // no BMC vigil knows sends one, so it is refused rather than guessed.
            return Err(HttpError::Protocol(format!(
                "refused to follow a relative reference {:?}",
                target.chars().take(120).collect::<String>()
            )));
        };
        Ok(match after_scheme.find('/') {
            Some(i) => after_scheme[i..].to_string(),
            None => "/".to_string(),
        })
    }

    fn head(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body_len: Option<usize>,
    ) -> Result<Vec<u8>, HttpError> {
        let unsafe_text = |s: &str| s.bytes().any(|b| b < b' ' || b == 0x7f);
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(HttpError::Protocol(format!(
                "refused to send a path with a space or control character: {:?}",
                path.chars().take(120).collect::<String>()
            )));
        }
        let mut h = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vigil/{}\r\nAccept: application/json\r\nOData-Version: 4.0\r\n",
            self.authority,
            env!("CARGO_PKG_VERSION")
        );
        for (n, v) in headers {
            if unsafe_text(n) || unsafe_text(v) || n.contains(':') {
                // A token the BMC gave back with a line break in it would smuggle a header.
                return Err(HttpError::Protocol(format!(
                    "refused to send header {n:?}: a control character in it"
                )));
            }
            h.push_str(n);
            h.push_str(": ");
            h.push_str(v);
            h.push_str("\r\n");
        }
        match body_len {
            Some(n) => {
                h.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {n}\r\n"
                ));
            }
            None if matches!(method, "POST" | "PUT" | "PATCH") => {
                h.push_str("Content-Length: 0\r\n");
            }
            None => {}
        }
        h.push_str("\r\n");
        Ok(h.into_bytes())
    }

    /// One exchange: `method` on `target` (a path, or an absolute URL from the BMC) with
    /// `headers`, a JSON `body` if any; the answer's body is capped at `max_body` bytes.
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        max_body: usize,
    ) -> Result<Response, HttpError> {
        let path = self.path_of(target)?;
        let head = self.head(method, &path, headers, body.map(<[u8]>::len))?;
        let idempotent = matches!(method, "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS");
        let exchange = async {
            let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take();
            let kept = kept.and_then(|mut c| still_usable(&mut c).then_some(c));
            let reused = kept.is_some();
            let mut conn = match kept {
                Some(c) => c,
                None => self.connect().await?,
            };
            let result = match exchange(&mut conn, method, &head, body, max_body).await {
                Err(f) if f.before_answer && reused && idempotent => {
                    tracing::debug!(bmc = %self.authority, error = %f.error, "the kept connection was closed: a new one");
                    conn = self.connect().await?;
                    exchange(&mut conn, method, &head, body, max_body).await
                }
                other => other,
            };
            match result {
                Ok((resp, keep)) => {
                    if keep {
                        *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                    }
                    Ok(resp)
                }
                Err(f) => Err(f.error),
            }
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .unwrap_or(Err(HttpError::Timeout))
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, HttpError> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| HttpError::Connect(io_text(&e)))?;
            let _ = tcp.set_nodelay(true);
            self.tls.connect(self.name.clone(), tcp).await.map_err(|e| {
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    // Only the certificate is a matter of trust (not transient); an alert, a
                    // BMC answering plain HTTP while it reboots or a broken record is a
                    // connection that failed, tried again at the next poll.
                    Some(
                        r @ (rustls::Error::InvalidCertificate(_)
                        | rustls::Error::NoCertificatesPresented),
                    ) => HttpError::Tls(r.to_string()),
                    Some(r @ rustls::Error::General(m)) if m.contains("certificate") => {
                        HttpError::Tls(r.to_string())
                    }
                    Some(r) => HttpError::Connect(format!("TLS handshake: {r}")),
                    None => HttpError::Connect(format!("TLS handshake: {}", io_text(&e))),
                }
            })
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .unwrap_or(Err(HttpError::Timeout))
    }

    /// Closes the kept connection politely (TLS close_notify), if there is one.
    pub async fn close(&self) {
        let conn = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut c) = conn {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.shutdown()).await;
        }
    }
}

/// Whether a kept connection can carry a request: nothing to read on it yet. The end of the
/// stream (the BMC closed it while idle), an error, or a stray byte (an answer nobody asked
/// for, a `408` some servers send before closing) and it is dropped: a stray byte would
/// otherwise be read as the next answer. TLS records that are not data (session tickets) are
/// taken in by the read and are no reason to drop it.
fn still_usable(conn: &mut TlsStream<TcpStream>) -> bool {
    use futures_util::FutureExt as _;
    let mut probe = [0u8; 1];
    // Polled once, without waiting: `None` is "would block", the healthy idle state.
    conn.read(&mut probe).now_or_never().is_none()
}

/// Reads more into `buf`; `Ok(0)` is the end of the stream (with or without close_notify:
/// many BMCs just close).
async fn read_more(conn: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    // Room only when there is none: a body whose length is known was reserved exactly.
    if buf.capacity() == buf.len() {
        buf.reserve(READ_CHUNK);
    }
    match conn.read_buf(buf).await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        other => other,
    }
}

/// Reads until `buf` holds `need` bytes.
async fn fill(
    conn: &mut TlsStream<TcpStream>,
    buf: &mut Vec<u8>,
    need: usize,
) -> Result<(), Failure> {
    while buf.len() < need {
        match read_more(conn, buf).await {
            Ok(0) => {
                return Err(Failure::late(HttpError::Io(
                    "the BMC closed the connection inside its answer".into(),
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::late(HttpError::Io(io_text(&e)))),
        }
    }
    Ok(())
}

/// A line ending at `\r\n` from `pos`, reading more as needed; returns where the line ends.
async fn line_end(
    conn: &mut TlsStream<TcpStream>,
    buf: &mut Vec<u8>,
    pos: usize,
) -> Result<usize, Failure> {
    loop {
        if let Some(end) = find_crlf(buf, pos) {
            return Ok(end);
        }
        if buf.len() - pos > MAX_LINE_BYTES {
            return Err(Failure::late(HttpError::Protocol(
                "a chunk-size or trailer line longer than 4 KiB".into(),
            )));
        }
        let need = buf.len() + 1;
        fill(conn, buf, need).await?;
    }
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    len: usize,
    keep_alive: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut hdrs);
    match r.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let headers: Vec<(String, String)> = r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).trim().to_string(),
                    )
                })
                .collect();
            let connection = headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
                .map(|(_, v)| v.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(",");
            let keep_alive = match r.version {
                Some(1) => !connection.contains("close"),
                _ => connection.contains("keep-alive"),
            };
            Ok(Some(Head {
                status: r.code.unwrap_or(0),
                headers,
                len,
                keep_alive,
            }))
        }
        Err(e) => Err(HttpError::Protocol(format!("not an HTTP answer ({e})"))),
    }
}

/// Writes the request and reads the whole answer; says whether the connection may be kept.
async fn exchange(
    conn: &mut TlsStream<TcpStream>,
    method: &str,
    head: &[u8],
    body: Option<&[u8]>,
    max_body: usize,
) -> Result<(Response, bool), Failure> {
    let write = async {
        conn.write_all(head).await?;
        if let Some(b) = body {
            conn.write_all(b).await?;
        }
        conn.flush().await
    };
    write
        .await
        .map_err(|e| Failure::early(HttpError::Io(io_text(&e))))?;

    let mut buf: Vec<u8> = Vec::new();
    // Whether any byte of an answer came (an interim 100 included: then the BMC has the
    // request, and a failure after it is not "before the answer").
    let mut answered = false;
    // Where the search for the head's end goes on from (the head is parsed once it is whole,
    // not again after every read).
    let mut scanned = 0;
    let head = loop {
        if let Some(end) = buf
            .get(scanned..)
            .and_then(|b| b.windows(4).position(|w| w == b"\r\n\r\n"))
        {
            let h = parse_head(&buf[..scanned + end + 4])
                .map_err(Failure::late)?
                .ok_or_else(|| {
                    Failure::late(HttpError::Protocol(
                        "an answer head that does not end".into(),
                    ))
                })?;
            // 1xx answers are interim: the real one follows.
            if (100..200).contains(&h.status) {
                buf.drain(..h.len);
                scanned = 0;
                continue;
            }
            break h;
        }
        scanned = buf.len().saturating_sub(3);
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Failure::late(HttpError::Protocol(
                "an answer head larger than 64 KiB".into(),
            )));
        }
        let fail = |e: HttpError| {
            if answered {
                Failure::late(e)
            } else {
                Failure::early(e)
            }
        };
        match read_more(conn, &mut buf).await {
            Ok(0) if !answered => {
                return Err(fail(HttpError::Io(
                    "the BMC closed the connection without answering".into(),
                )));
            }
            Ok(0) => {
                return Err(Failure::late(HttpError::Io(
                    "the BMC closed the connection inside its answer head".into(),
                )));
            }
            Ok(_) => answered = true,
            Err(e) => return Err(fail(HttpError::Io(io_text(&e)))),
        }
    };
    buf.drain(..head.len);
    let too_large = || Failure::late(HttpError::TooLarge(max_body));
    let protocol = |m: String| Failure::late(HttpError::Protocol(m));
    let values = |name: &str| -> Vec<&str> {
        head.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let mut keep = head.keep_alive;
    // Transfer codings, all headers joined: the last one says how the body ends.
    let codings = values("transfer-encoding").join(",");
    let last_coding = codings
        .rsplit(',')
        .next()
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty());
    let lengths = values("content-length");
    let body = if method == "HEAD" || head.status == 204 || head.status == 304 {
        keep &= buf.is_empty();
        Vec::new()
    } else if last_coding.as_deref() == Some("chunked") {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let end = line_end(conn, &mut buf, pos).await?;
            let line = std::str::from_utf8(&buf[pos..end]).unwrap_or("");
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = (!size_text.is_empty() && size_text.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| usize::from_str_radix(size_text, 16).ok())
                .flatten()
                .ok_or_else(|| {
                    protocol(format!(
                        "a bad chunk size {:?}",
                        size_text.chars().take(20).collect::<String>()
                    ))
                })?;
            pos = end + 2;
            if size == 0 {
                // Trailers, until an empty line; as capped as a head.
                let start = pos;
                loop {
                    let end = line_end(conn, &mut buf, pos).await?;
                    let empty = end == pos;
                    pos = end + 2;
                    if empty {
                        break;
                    }
                    if pos - start > MAX_HEAD_BYTES {
                        return Err(protocol("trailers larger than 64 KiB".into()));
                    }
                }
                break;
            }
            // out.len() <= max_body always: no overflow, however large the size.
            if size > max_body - out.len() {
                return Err(too_large());
            }
            fill(conn, &mut buf, pos + size + 2).await?;
            if &buf[pos + size..pos + size + 2] != b"\r\n" {
                return Err(protocol("a chunk not followed by CRLF".into()));
            }
            out.extend_from_slice(&buf[pos..pos + size]);
            buf.drain(..pos + size + 2);
            pos = 0;
        }
        keep &= pos == buf.len();
        out
    } else if last_coding.is_some() {
        // A coding other than chunked last: the body ends with the connection (RFC 9112 6.3).
        read_to_end(conn, buf, max_body).await?
    } else if let Some(cl) = lengths.first() {
        if lengths.iter().any(|l| l != cl) {
            return Err(protocol("differing Content-Length headers".into()));
        }
        let len: usize = cl
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| cl.parse().ok())
            .flatten()
            .ok_or_else(|| {
                protocol(format!(
                    "a bad Content-Length {:?}",
                    cl.chars().take(20).collect::<String>()
                ))
            })?;
        if len > max_body {
            return Err(too_large());
        }
        buf.reserve_exact(len.saturating_sub(buf.len()));
        fill(conn, &mut buf, len).await?;
        // Bytes past the body were never asked for: the connection is not trusted further.
        keep &= buf.len() == len;
        buf.truncate(len);
        buf
    } else {
        // Delimited by the end of the connection.
        keep = false;
        read_to_end(conn, buf, max_body).await?
    };
    Ok((
        Response {
            status: head.status,
            headers: head.headers,
            body,
        },
        keep,
    ))
}

/// Reads a body delimited by the end of the connection, capped.
async fn read_to_end(
    conn: &mut TlsStream<TcpStream>,
    mut buf: Vec<u8>,
    max_body: usize,
) -> Result<Vec<u8>, Failure> {
    loop {
        if buf.len() > max_body {
            return Err(Failure::late(HttpError::TooLarge(max_body)));
        }
        match read_more(conn, &mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(Failure::late(HttpError::Io(io_text(&e)))),
        }
    }
    if buf.len() > max_body {
        return Err(Failure::late(HttpError::TooLarge(max_body)));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_host_port_and_prefix() {
        let (a, h, p, pre) = split_url("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (a.as_str(), h.as_str(), p, pre.as_str()),
            ("127.0.0.1:8443", "127.0.0.1", 8443, "")
        );
        let (a, h, p, pre) = split_url("HTTPS://bmc.example/base/").unwrap();
        assert_eq!(
            (a.as_str(), h.as_str(), p, pre.as_str()),
            ("bmc.example", "bmc.example", 443, "/base")
        );
        let (_, h, p, _) = split_url("https://[fd00::5]:9443").unwrap();
        assert_eq!((h.as_str(), p), ("fd00::5", 9443));
        for bad in [
            "http://10.0.0.1",
            "https://",
            "https://admin:pw@10.0.0.1",
            "https://10.0.0.1:99999",
            "https://[fd00::5",
            "https://10.0.0.1/a b",
        ] {
            assert!(split_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn heads_parse_keep_alive_by_version_and_connection() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.len, h.keep_alive), (200, 38, true));
        let h = parse_head(b"HTTP/1.1 200 OK\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-")
                .unwrap()
                .is_none()
        );
        assert!(parse_head(b"<html>hello</html>\r\n\r\n").is_err());
    }

    #[test]
    fn basic_auth_is_rfc7617() {
        // RFC 7617's own example.
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }
}
