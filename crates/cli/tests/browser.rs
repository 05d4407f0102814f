//! `mnist serve` in a real browser: headless Chromium driven by ChromeDriver (WebDriver, spoken
//! here over HTTP with ureq) draws a "1" and a "7" on the page with pointer actions, uploads a
//! transparent PNG, and checks that the digit the page shows is the one the API answers for the
//! same image, and that the feature-map tiles were drawn. Screenshots go to
//! `target/browser-screenshots/`.
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs) and the real MNIST to train the model it serves. Without them the test
//! says SKIPPED loudly and passes, unless `MNIST_REQUIRE_BROWSER` is set, as CI sets it.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A child process killed when dropped, so a failed assertion leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// A WebDriver call; the answer's `value`.
fn webdriver(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> Value {
    let mut response = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        (_, body) => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body.unwrap_or(json!({})).to_string()),
    }
    .unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["value"].get("error").is_none(),
        "{method} {url}: {text}"
    );
    answer["value"].clone()
}

/// The WebDriver id of the first element `css` selects.
fn element(agent: &ureq::Agent, session: &str, css: &str) -> String {
    let found = webdriver(
        agent,
        "POST",
        &format!("{session}/element"),
        Some(json!({"using": "css selector", "value": css})),
    );
    let id = found
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str);
    id.unwrap_or_else(|| panic!("no element {css}")).to_string()
}

/// What `script` returns in the page.
fn script(agent: &ureq::Agent, session: &str, script: &str) -> Value {
    webdriver(
        agent,
        "POST",
        &format!("{session}/execute/sync"),
        Some(json!({"script": script, "args": []})),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tools_or_skip() -> bool {
    let found = ["chromium", "chromedriver"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        let required = std::env::var("MNIST_REQUIRE_BROWSER").is_ok_and(|v| v != "0");
        assert!(
            !required,
            "chromium or chromedriver is missing and MNIST_REQUIRE_BROWSER is set"
        );
        eprintln!(
            "\n*** SKIPPED the browser test: no chromium and chromedriver (apt-get install \
             chromium chromium-driver) ***\n"
        );
    }
    found
}

/// A lenet5 trained for one epoch on the real MNIST, in `dir/run`.
fn trained_model(dir: &Path, data: &Path) -> PathBuf {
    let run = dir.join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_mnist"))
        .args([
            "train",
            "--model",
            "lenet5",
            "--epochs",
            "1",
            "--quiet",
            "--data-dir",
        ])
        .arg(data)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    run.join("final.safetensors")
}

/// Starts `mnist serve` on a free port; its base URL.
fn serve(model: &Path) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mnist"))
        .args(["serve", "--port", "0", "--model-file"])
        .arg(model)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches('/')
        .to_string();
    (Running(child), url)
}

/// The digit the page shows once the drawing's prediction has arrived and stopped changing.
fn shown_digit(agent: &ureq::Agent, session: &str, previous: &str) -> String {
    let started = Instant::now();
    loop {
        let digit = script(
            agent,
            session,
            "return document.getElementById('digit').textContent",
        );
        let digit = digit.as_str().unwrap_or("?").to_string();
        if digit != "?" && digit != previous {
            // Let the debounced requests settle, then read it again.
            std::thread::sleep(Duration::from_millis(600));
            let settled = script(
                agent,
                session,
                "return document.getElementById('digit').textContent",
            );
            return settled.as_str().unwrap_or("?").to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no prediction shown"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the API answers for the canvas as it is now (the PNG the page sends).
fn api_digit_of_canvas(agent: &ureq::Agent, session: &str, base: &str) -> u64 {
    let data_url = script(
        agent,
        session,
        "return document.getElementById('pad').toDataURL('image/png')",
    );
    let png = decode_base64(
        data_url
            .as_str()
            .unwrap()
            .trim_start_matches("data:image/png;base64,"),
    );
    api_digit(agent, base, png)
}

fn api_digit(agent: &ureq::Agent, base: &str, png: Vec<u8>) -> u64 {
    let mut response = agent
        .post(&format!("{base}/api/predict"))
        .header("Content-Type", "image/png")
        .send(png)
        .unwrap();
    let answer: Value =
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    answer["digit"].as_u64().unwrap()
}

/// Standard base64 (RFC 4648), as data URLs and WebDriver screenshots carry it.
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(value(c)) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// Pointer actions drawing a polyline over the pad, in CSS pixels from its centre.
fn stroke(agent: &ureq::Agent, session: &str, pad: &str, points: &[(i64, i64)]) {
    let origin = json!({"element-6066-11e4-a52e-4f735466cecf": pad});
    let mut actions = vec![
        json!({"type": "pointerMove", "duration": 0, "origin": origin, "x": points[0].0, "y": points[0].1}),
        json!({"type": "pointerDown", "button": 0}),
    ];
    for &(x, y) in &points[1..] {
        actions.push(
            json!({"type": "pointerMove", "duration": 120, "origin": origin, "x": x, "y": y}),
        );
    }
    actions.push(json!({"type": "pointerUp", "button": 0}));
    webdriver(
        agent,
        "POST",
        &format!("{session}/actions"),
        Some(
            json!({"actions": [{"type": "pointer", "id": "pen", "parameters": {"pointerType": "mouse"}, "actions": actions}]}),
        ),
    );
}

fn screenshot(agent: &ureq::Agent, session: &str, name: &str) {
    let image = webdriver(agent, "GET", &format!("{session}/screenshot"), None);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/browser-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), decode_base64(image.as_str().unwrap())).unwrap();
}

#[test]
fn the_page_shows_what_the_api_answers_for_drawn_and_uploaded_digits() {
    if !tools_or_skip() {
        return;
    }
    let Some(data) = mnist_data::testing::real_data_or_skip("the browser test") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path(), &data);
    let (_server, base) = serve(&model);
    let port = free_port();
    let _driver = Running(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver = format!("http://127.0.0.1:{port}");
    let agent = agent();
    let started = Instant::now();
    while agent.get(&format!("{driver}/status")).call().is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let profile = tempfile::tempdir().unwrap();
    let session = webdriver(
        &agent,
        "POST",
        &format!("{driver}/session"),
        Some(
            json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1000,1400", format!("--user-data-dir={}", profile.path().display())]
            }}}}),
        ),
    );
    let session = format!(
        "{driver}/session/{}",
        session["sessionId"].as_str().unwrap()
    );
    webdriver(
        &agent,
        "POST",
        &format!("{session}/url"),
        Some(json!({"url": format!("{base}/")})),
    );
    let pad = element(&agent, &session, "#pad");

    // A "1": one vertical stroke. Then a "7".
    let mut shown = "?".to_string();
    for (name, points, clear) in [
        ("one", vec![(0, -105), (0, 105)], false),
        ("seven", vec![(-70, -100), (70, -100), (-10, 110)], true),
    ] {
        if clear {
            let button = element(&agent, &session, "#clear");
            webdriver(
                &agent,
                "POST",
                &format!("{session}/element/{button}/click"),
                None,
            );
        }
        stroke(&agent, &session, &pad, &points);
        shown = shown_digit(&agent, &session, if clear { "?" } else { &shown });
        let api = api_digit_of_canvas(&agent, &session, &base);
        println!("drew a {name}: the page shows {shown}, the API answers {api}");
        assert_eq!(shown, api.to_string(), "{name}");
        let tiles = script(
            &agent,
            &session,
            "return document.querySelectorAll('#maps canvas').length",
        );
        // lenet5: 6 maps of its first convolution and 16 of its second.
        assert_eq!(tiles, json!(22), "{name}: feature-map tiles");
        screenshot(&agent, &session, &format!("{name}.png"));
    }
    assert_eq!(shown, "7", "a plainly drawn 7");

    // A transparent PNG, as drawing apps export: black ink, alpha 0 elsewhere (hidden black).
    let transparent = image::RgbaImage::from_fn(120, 120, |x, y| {
        let ink = (55..65).contains(&x) && (15..105).contains(&y);
        image::Rgba(if ink { [0, 0, 0, 255] } else { [0, 0, 0, 0] })
    });
    let path = dir.path().join("one.png");
    transparent.save(&path).unwrap();
    let input = element(&agent, &session, "#file");
    webdriver(
        &agent,
        "POST",
        &format!("{session}/element/{input}/value"),
        Some(json!({"text": path.display().to_string()})),
    );
    let uploaded = shown_digit(&agent, &session, &shown);
    let api = api_digit(&agent, &base, std::fs::read(&path).unwrap());
    println!("uploaded a transparent PNG of a 1: the page shows {uploaded}, the API answers {api}");
    assert_eq!(uploaded, api.to_string());
    assert_eq!(uploaded, "1");
    screenshot(&agent, &session, "uploaded.png");
    webdriver(&agent, "DELETE", &session, None);
}
