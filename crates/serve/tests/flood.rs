//! Thousands of malformed and adversarial requests over a real socket on 127.0.0.1: random
//! bytes instead of HTTP, random bodies under every content type, truncated images, huge
//! headers, clients that stall mid-request. Every answer that comes is a 4xx with a JSON
//! message (or, for what is not HTTP at all, hyper's 400 or a closed connection), nothing
//! reaches a panic, a good request is answered correctly afterwards, and the process's peak
//! memory stays under 300 MB. Bounded in count and time; it stops by itself.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mnist_data::Normalization;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A deterministic stream of bytes for `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a request must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Not HTTP: a 4xx from hyper, or the connection closed.
    NotHttp,
    /// Well-formed HTTP with a bad body: a 4xx with a JSON message.
    Refused,
    /// Either a prediction or a 4xx with a JSON message.
    AnsweredOrRefused,
}

/// Sends `request` and reads the answer: its status and body, or `None` if the server closed
/// the connection without one.
async fn exchange(address: std::net::SocketAddr, request: &[u8]) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    // A server may answer and close before the whole request is written.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 15 s");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

fn http(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// The process's peak resident memory, in MB (Linux's VmHWM).
fn peak_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_bad_requests_get_4xx_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let state = serve::AppState::new(
        nn::Sequential::new(nn::preset("lenet5").unwrap(), 1).unwrap(),
        Normalization {
            mean: 0.13,
            std: 0.31,
        },
        &dir.path().join("m.safetensors"),
        serve::Limits {
            request_timeout: Duration::from_secs(2),
            ..serve::Limits::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve(listener, state, async {
        let _ = stopped.await;
    }));

    let png = {
        let mut png = std::io::Cursor::new(Vec::new());
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x == 30 { 0 } else { 250 }]))
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        png.into_inner()
    };
    let mut requests: Vec<(Vec<u8>, Expect)> = Vec::new();
    // Not HTTP at all.
    for seed in 0..500 {
        requests.push((
            noise(seed, 1 + (seed as usize * 37) % 3000),
            Expect::NotHttp,
        ));
    }
    // Random bodies under each content type, and truncated images.
    let types = [
        "application/json",
        "image/png",
        "image/jpeg",
        "text/plain",
        "application/octet-stream",
    ];
    for seed in 0..1500u64 {
        let body = noise(seed + 10_000, (seed as usize * 131) % 20_000);
        requests.push((
            http(types[seed as usize % types.len()], &body),
            Expect::Refused,
        ));
    }
    // Truncated images: refused, unless the cut only lost what a decoder can do without.
    for cut in (0..png.len()).step_by(png.len() / 200 + 1) {
        requests.push((http("image/png", &png[..cut]), Expect::AnsweredOrRefused));
    }
    // Headers of megabytes.
    for size in [1_000_000usize, 4_000_000] {
        let mut request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', size));
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        requests.push((request, Expect::NotHttp));
    }
    let total = requests.len();
    // Clients that stall after half a request, held open while the flood goes on.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n")
            .await
            .unwrap();
        stalled.push(stream);
    }
    let (mut refused, mut accepted, mut closed) = (0, 0, 0);
    for chunk in requests.chunks(32) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(request, expect)| {
                tokio::spawn(async move { (exchange(address, &request).await, expect) })
            })
            .collect();
        for task in tasks {
            match task.await.unwrap() {
                (Some((200, body)), Expect::AnsweredOrRefused) => {
                    assert!(body.contains("\"probabilities\""), "{body}");
                    accepted += 1;
                }
                (Some((status, body)), expect) => {
                    refused += 1;
                    assert!(
                        (400..500).contains(&status),
                        "{expect:?}: status {status}: {body}"
                    );
                    // hyper itself answers what is not HTTP, or a head too large (431).
                    if expect != Expect::NotHttp && status != 431 {
                        let json: serde_json::Value = serde_json::from_str(&body)
                            .unwrap_or_else(|_| panic!("status {status}, body not JSON: {body:?}"));
                        assert!(json["error"].is_string(), "{body}");
                    }
                }
                (None, expect) => {
                    assert_eq!(
                        expect,
                        Expect::NotHttp,
                        "a well-formed request got no answer"
                    );
                    closed += 1;
                }
            }
        }
    }
    println!(
        "{total} bad requests: {refused} refused with a 4xx, {accepted} truncated images still \
         decoded and answered, {closed} connections closed without an answer"
    );
    // A good request still gets the right answer.
    let pixels = serde_json::json!({"pixels": vec![0; 784]}).to_string();
    let (status, body) = exchange(address, &http("application/json", pixels.as_bytes()))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"probabilities\""), "{body}");
    drop(stalled);
    let peak = peak_mb();
    println!("peak memory of the test process: {peak:.0} MB");
    assert!(peak < 300.0, "peak memory {peak:.0} MB");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
