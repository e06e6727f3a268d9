//! vigil's own HTTPS client for BMCs (`vigil::bmc::redfish::http`) against a raw TLS server
//! on a loopback socket that answers exactly the bytes a test scripts: the framings real BMC
//! web servers use (Content-Length, chunked with extensions and trailers, close-delimited
//! HTTP/1.0, an interim 100), a BMC that closes an idle kept connection, and the bad cases
//! (an answer that is not HTTP, a body over the cap, a BMC that never answers or closes inside
//! its answer, a header that would smuggle a line).

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use vigil::bmc::redfish::http::{Client, HttpError};
use vigil::bmc::redfish::tls::client_config;
use vigil::config::RedfishTrust;

/// What the server does with one request.
enum Step {
    /// Answer these bytes and keep the connection.
    Send(Vec<u8>),
    /// Answer these bytes, then close.
    SendClose(Vec<u8>),
    /// Close without answering.
    Close,
    /// Never answer.
    Hang,
}

type Script = dyn Fn(usize, usize, &str) -> Step + Send + Sync;

struct Server {
    url: String,
    trust: RedfishTrust,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

async fn server(script: Arc<Script>) -> Server {
    let ca = vigil_lab::tls::LabCa::new("bmc-http-test").unwrap();
    let cert = ca.issue("raw").unwrap();
    let fp: Vec<u8> = cert
        .fingerprint
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.config.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let conn_no = c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, script, r) = (acceptor.clone(), script.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                for req_no in 0.. {
                    // One request: the head, then a Content-Length body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
                    buf.drain(..head_end + len);
                    r.lock().unwrap().push(format!("{head}{body}"));
                    match script(conn_no, req_no, &head) {
                        Step::Send(b) => {
                            if tls.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        Step::SendClose(b) => {
                            let _ = tls.write_all(&b).await;
                            let _ = tls.shutdown().await;
                            return;
                        }
                        Step::Close => return,
                        Step::Hang => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    Server {
        url,
        trust: RedfishTrust::Fingerprint(fp.try_into().unwrap()),
        connections,
        requests,
    }
}

fn client(s: &Server) -> Client {
    Client::new(
        &s.url,
        client_config(&s.trust).unwrap(),
        Duration::from_secs(2),
        Duration::from_secs(1),
    )
    .unwrap()
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const CAP: usize = 1 << 20;

#[tokio::test]
async fn content_length_answers_reuse_one_connection() {
    let s = server(Arc::new(|_, n, _| {
        Step::Send(ok(&format!("{{\"n\":{n}}}")))
    }))
    .await;
    let c = client(&s);
    for n in 0..3 {
        let r = c
            .send("GET", "/redfish/v1", &[("X-Auth-Token", "t0k")], None, CAP)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, format!("{{\"n\":{n}}}").as_bytes());
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(s.connections.load(Ordering::SeqCst), 1);
    let reqs = s.requests.lock().unwrap().clone();
    assert!(
        reqs[0].starts_with("GET /redfish/v1 HTTP/1.1\r\n"),
        "{}",
        reqs[0]
    );
    assert!(reqs[0].contains("\r\nX-Auth-Token: t0k\r\n"), "{}", reqs[0]);
    assert!(
        reqs[0].contains(&format!("\r\nHost: {}\r\n", &s.url[8..])),
        "{}",
        reqs[0]
    );

    // A JSON body goes with its type and length; an absolute URL is followed by its path.
    let r = c
        .send(
            "POST",
            "https://bmc.behind.nat:443/redfish/v1/SessionService/Sessions",
            &[],
            Some(br#"{"UserName":"u"}"#),
            CAP,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let last = s.requests.lock().unwrap().last().unwrap().clone();
    assert!(
        last.starts_with("POST /redfish/v1/SessionService/Sessions HTTP/1.1\r\n"),
        "{last}"
    );
    assert!(last.contains("\r\nContent-Type: application/json\r\nContent-Length: 16\r\n"));
    assert!(last.ends_with("\r\n\r\n{\"UserName\":\"u\"}"), "{last}");
}

#[tokio::test]
async fn chunked_bodies_with_extensions_and_trailers_and_an_interim_100() {
    let s = server(Arc::new(|_, n, _| {
        let mut b = Vec::new();
        if n == 1 {
            b.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        b.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=x\r\n{\"a\":\r\n3\r\n 42\r\nA\r\n, \"b\": [] \r\n1\r\n}\r\n0\r\nX-Trailer: yes\r\n\r\n",
        );
        Step::Send(b)
    }))
    .await;
    let c = client(&s);
    for _ in 0..2 {
        let r = c.send("GET", "/x", &[], None, CAP).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            "{\"a\": 42, \"b\": [] }"
        );
    }
    assert_eq!(
        s.connections.load(Ordering::SeqCst),
        1,
        "chunked keeps the connection"
    );
}

#[tokio::test]
async fn a_kept_connection_the_bmc_closed_is_replaced_once() {
    // The BMC closes after each answer without saying so (no Connection: close).
    let s = server(Arc::new(|_, _, _| Step::SendClose(ok("{}")))).await;
    let c = client(&s);
    for _ in 0..3 {
        let r = c.send("GET", "/x", &[], None, CAP).await.unwrap();
        assert_eq!(r.body, b"{}");
    }
    assert_eq!(s.connections.load(Ordering::SeqCst), 3);
    assert_eq!(
        s.requests.lock().unwrap().len(),
        3,
        "each request reached the BMC once"
    );

    // A new connection that breaks before the answer is not retried.
    let s = server(Arc::new(|_, _, _| Step::Close)).await;
    let c = client(&s);
    let e = c.send("GET", "/x", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Io(_)), "{e:?}");
    assert_eq!(s.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn close_delimited_http_1_0_bodies_are_read_to_the_end() {
    let s = server(Arc::new(|_, _, _| {
        Step::SendClose(
            b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"old\": true}".to_vec(),
        )
    }))
    .await;
    let c = client(&s);
    for _ in 0..2 {
        let r = c.send("GET", "/x", &[], None, CAP).await.unwrap();
        assert_eq!(r.body, b"{\"old\": true}");
    }
    assert_eq!(
        s.connections.load(Ordering::SeqCst),
        2,
        "HTTP/1.0 is not kept"
    );
}

#[tokio::test]
async fn bad_answers_are_typed_and_bounded() {
    let s = server(Arc::new(|conn, _, head| {
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        match path.as_str() {
            "/big" => Step::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{".to_vec()),
            "/bigchunks" => {
                let mut b = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for _ in 0..5 {
                    b.extend_from_slice(format!("{:x}\r\n", 1 << 18).as_bytes());
                    b.extend(std::iter::repeat_n(b' ', 1 << 18));
                    b.extend_from_slice(b"\r\n");
                }
                Step::Send(b)
            }
            "/html" => Step::SendClose(b"<html>login</html>\r\n\r\n".to_vec()),
            "/cut" => {
                Step::SendClose(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"a\"".to_vec())
            }
            "/badchunk" => Step::SendClose(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            ),
            "/hang" => Step::Hang,
            _ => Step::Send(ok(&format!("{{\"conn\":{conn}}}"))),
        }
    }))
    .await;
    let c = client(&s);
    let e = c.send("GET", "/big", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::TooLarge(CAP)), "{e:?}");
    let e = c
        .send("GET", "/bigchunks", &[], None, CAP)
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::TooLarge(CAP)), "{e:?}");
    let e = c.send("GET", "/html", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Protocol(_)), "{e:?}");
    let e = c.send("GET", "/cut", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Io(_)), "{e:?}");
    let e = c
        .send("GET", "/badchunk", &[], None, CAP)
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Protocol(_)), "{e:?}");
    let t0 = Instant::now();
    let e = c.send("GET", "/hang", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Timeout), "{e:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1900),
        "{took:?}"
    );
    // After every failure a fresh connection serves the next request.
    let before = s.connections.load(Ordering::SeqCst);
    let r = c.send("GET", "/fine", &[], None, CAP).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(s.connections.load(Ordering::SeqCst), before + 1);

    // A token with a line break would smuggle a header: refused before anything is sent.
    let sent = s.requests.lock().unwrap().len();
    let e = c
        .send(
            "GET",
            "/fine",
            &[("X-Auth-Token", "a\r\nX-Evil: 1")],
            None,
            CAP,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Protocol(_)), "{e:?}");
    let e = c.send("GET", "/a b", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Protocol(_)), "{e:?}");
    assert_eq!(s.requests.lock().unwrap().len(), sent);
}

#[tokio::test]
async fn an_untrusted_certificate_and_a_closed_port_are_told_apart() {
    let s = server(Arc::new(|_, _, _| Step::Send(ok("{}")))).await;
    let wrong = RedfishTrust::Fingerprint([7; 32]);
    let c = Client::new(
        &s.url,
        client_config(&wrong).unwrap(),
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = c.send("GET", "/x", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Tls(_)), "{e:?}");

    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Client::new(
        &format!("https://127.0.0.1:{port}"),
        client_config(&s.trust).unwrap(),
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = c.send("GET", "/x", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Connect(_)), "{e:?}");
}

#[tokio::test]
async fn a_post_is_never_sent_twice_and_a_get_is_sent_again_once() {
    // The BMC drops the kept connection after it has the second request, without answering.
    let s = server(Arc::new(|conn, n, _| match (conn, n) {
        (0, 0) => Step::Send(ok("{}")),
        (0, _) => Step::Close,
        _ => Step::Send(ok("{\"again\":true}")),
    }))
    .await;
    let c = client(&s);
    c.send("GET", "/x", &[], None, CAP).await.unwrap();
    let e = c
        .send("POST", "/reset", &[], Some(b"{}"), CAP)
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Io(_)), "{e:?}");
    assert_eq!(s.requests.lock().unwrap().len(), 2, "the POST went once");

    let s = server(Arc::new(|conn, n, _| match (conn, n) {
        (0, 0) => Step::Send(ok("{}")),
        (0, _) => Step::Close,
        _ => Step::Send(ok("{\"again\":true}")),
    }))
    .await;
    let c = client(&s);
    c.send("GET", "/x", &[], None, CAP).await.unwrap();
    let r = c.send("GET", "/y", &[], None, CAP).await.unwrap();
    assert_eq!(r.body, b"{\"again\":true}");
    assert_eq!(s.requests.lock().unwrap().len(), 3, "the GET went twice");
    assert_eq!(s.connections.load(Ordering::SeqCst), 2);

    // An interim 100 proves the BMC has the request: a failure after it is not retried.
    let s = server(Arc::new(|conn, n, _| match (conn, n) {
        (0, 0) => Step::Send(ok("{}")),
        (0, _) => Step::SendClose(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
        _ => Step::Send(ok("{}")),
    }))
    .await;
    let c = client(&s);
    c.send("GET", "/x", &[], None, CAP).await.unwrap();
    let e = c.send("GET", "/y", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Io(_)), "{e:?}");
    assert_eq!(s.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn hostile_chunk_sizes_and_trailers_are_bounded() {
    let s = server(Arc::new(|_, _, head| {
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        let mut b = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        match path.as_str() {
            "/wrap" => b.extend_from_slice(b"2\r\nab\r\nFFFFFFFFFFFFFFFE\r\n"),
            "/overflow" => b.extend_from_slice(b"2\r\nab\r\n1000000000000000000000000\r\n"),
            "/plus" => b.extend_from_slice(b"+2\r\nab\r\n0\r\n\r\n"),
            _ => {
                b.extend_from_slice(b"0\r\n");
                for _ in 0..20_000 {
                    b.extend_from_slice(b"X-Flood: yes\r\n");
                }
            }
        }
        Step::SendClose(b)
    }))
    .await;
    let c = client(&s);
    let e = c.send("GET", "/wrap", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::TooLarge(CAP)), "{e:?}");
    for p in ["/overflow", "/plus", "/trailers"] {
        let e = c.send("GET", p, &[], None, CAP).await.unwrap_err();
        assert!(matches!(e, HttpError::Protocol(_)), "{p}: {e:?}");
    }
}

#[tokio::test]
async fn framing_is_strict_and_secrets_stay_out_of_debug() {
    let s = server(Arc::new(|_, _, head| {
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        match path.as_str() {
            "/two-lengths" => Step::SendClose(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
            ),
            "/gzip" => Step::SendClose(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw-until-close".to_vec(),
            ),
            _ => Step::Send(
                b"HTTP/1.1 201 Created\r\nX-Auth-Token: s3cr3t-t0k3n\r\nContent-Length: 2\r\n\r\n{}"
                    .to_vec(),
            ),
        }
    }))
    .await;
    let c = client(&s);
    let e = c
        .send("GET", "/two-lengths", &[], None, CAP)
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Protocol(_)), "{e:?}");
    let r = c.send("GET", "/gzip", &[], None, CAP).await.unwrap();
    assert_eq!(r.body, b"raw-until-close");
    let r = c
        .send("POST", "/login", &[], Some(b"{}"), CAP)
        .await
        .unwrap();
    assert_eq!(r.header("x-auth-token"), Some("s3cr3t-t0k3n"));
    assert!(!format!("{r:?}").contains("s3cr3t"), "{r:?}");
    let e = c
        .send("GET", "Sessions/1", &[], None, CAP)
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Protocol(_)), "{e:?}");
}

#[tokio::test]
async fn a_bmc_answering_plain_http_on_its_tls_port_is_a_failed_connection_not_a_trust_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let c = Client::new(
        &url,
        client_config(&RedfishTrust::Fingerprint([7; 32])).unwrap(),
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = c.send("GET", "/x", &[], None, CAP).await.unwrap_err();
    assert!(matches!(e, HttpError::Connect(_)), "{e:?}");
}
