//! The log never holds up a request: a log reader that stops reading costs log lines
//! (counted, and told of once it reads again), never latency. A flood of denials costs a
//! few lines a second, and the recording still replays every request.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use qb_mock::MockServer;
use reset_gateway::simulate::reader::Reader;

use crate::common::*;
use crate::process::{gateway, spawn_gateway};

const NOTICE: &str = "log lines dropped: the log sink did not keep up";

#[tokio::test]
async fn a_log_reader_that_stops_reading_costs_lines_not_latency() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    // A short queue, so that a few thousand lines overflow it and the pipe behind it.
    std::fs::write(&config, yaml(&mock.url(), "", "log:\n  queue_lines: 64\n")).unwrap();
    let mut child = gateway()
        .arg("--config")
        .arg(&config)
        .env("QB_API_KEY", SERVER_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read up to "serving", then leave the pipe unread: it fills (64 KiB), then the queue.
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let (addr, admin) = loop {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "the gateway exited");
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        if json["message"] == "serving" {
            break (
                json["listen"].as_str().unwrap().parse().unwrap(),
                json["admin"].as_str().unwrap().parse().unwrap(),
            );
        }
    };
    let request = |n: usize| {
        format!(
            "GET {RESET}?email=user{n}%40example.com HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             QB-Token: {IOS_TOKEN}\r\nX-Request-Id: stalled-{n}\r\n\r\n"
        )
    };
    // Every request is answered (`raw` gives each 10 s: "does not hang", not a speed test).
    for n in 0..3000 {
        let reply = raw(addr, request(n).as_bytes()).await;
        assert_eq!(reply.status, 200, "request {n}: {}", reply.body);
    }
    let metrics = raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    let dropped = sample(&metrics.body, "reset_gateway_log_lines_dropped_total").unwrap();
    assert!(dropped > 0.0, "{}", metrics.body);
    assert_eq!(
        sample(
            &metrics.body,
            "reset_gateway_requests_total{outcome=\"forwarded\"}"
        ),
        Some(3000.0),
        "nothing else changes"
    );

    // The reader comes back: lines flow again, the first ones after the gap saying how
    // many were dropped.
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in log.lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    // The queue may still be full while the reader catches up (a line logged then is
    // dropped and counted too): requests go on until one of them is logged.
    let mut logged = None;
    for n in 3000..3100 {
        let reply = raw(addr, request(n).as_bytes()).await;
        assert_eq!(reply.status, 200);
        let id = format!("\"stalled-{n}\"");
        let seen = poll_until(
            50,
            async || lines.lock().unwrap().clone(),
            |lines: &Vec<String>| lines.iter().any(|l| l.contains(&id)),
        )
        .await;
        if seen.iter().any(|l| l.contains(&id)) {
            logged = Some(seen);
            break;
        }
    }
    let seen = logged.expect("no request logged after the reader came back");
    let notice = seen
        .iter()
        .find(|l| l.contains(NOTICE))
        .unwrap_or_else(|| panic!("no drop notice in {} lines", seen.len()));
    let notice: serde_json::Value = serde_json::from_str(notice).unwrap();
    assert_eq!(notice["level"], "WARN");
    assert!(notice["dropped"].as_u64().unwrap() > 0, "{notice}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Per-email limit of 3 an hour, so that every request after the third is a 429.
const ONE_ADDRESS: &str = "  limits:\n    per_ip: []\n    per_client: []\n\
    \x20   per_email: [{ requests: 3, per: 1h }]\n    global: []\n";

/// Floods one address with `requests` resets under `log_extra`; the access lines, once
/// the process has exited (SIGTERM writes out the pending summaries).
async fn flood(requests: usize, log_extra: &str) -> Vec<String> {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let top = format!("log:\n{log_extra}");
    std::fs::write(&config, yaml(&mock.url(), ONE_ADDRESS, &top)).unwrap();
    let mut gateway = spawn_gateway(&config);
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    // One keep-alive connection: the flood is as fast as the gateway answers.
    let one =
        format!("GET {RESET}?email={ALICE} HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\n\r\n");
    let mut answers = 0;
    let mut read = Vec::new();
    for _ in 0..requests {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(one.as_bytes()).await.unwrap();
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            read.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&read);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if read.len() >= end + 4 + length {
                    read.drain(..end + 4 + length);
                    answers += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(answers, requests);
    gateway.signal("TERM");
    // The summaries of the last window are written at shutdown, after "draining".
    let logs = gateway.logs_to_end();
    logs.into_iter()
        .filter(|l| l.contains("\"target\":\"access\""))
        .collect()
}

#[tokio::test]
async fn a_flood_of_one_address_costs_a_few_lines_a_window_and_still_replays_whole() {
    const REQUESTS: usize = 1500;
    let lines = flood(REQUESTS, "  denial_window: 1s\n").await;
    let json: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied: Vec<&serde_json::Value> = json
        .iter()
        .filter(|j| j["outcome"] == "rate_limited")
        .collect();
    let summaries: Vec<&&serde_json::Value> =
        denied.iter().filter(|j| j["count"].is_u64()).collect();
    // Every denial is accounted for: a line each, or a summary's count.
    let accounted: u64 = denied
        .iter()
        .map(|j| j["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(accounted, REQUESTS as u64 - 3);
    assert!(!summaries.is_empty(), "{lines:#?}");
    // At most three in full and one summary per window the flood spanned.
    let times: Vec<u64> = denied
        .iter()
        .flat_map(|j| [&j["received_at"], &j["last_received_at"]])
        .filter_map(|t| t.as_str())
        .map(|t| reset_gateway::simulate::reader::parse_time(t).unwrap())
        .collect();
    let span_s = (times.iter().max().unwrap() - times.iter().min().unwrap()) / 1_000_000_000;
    let windows = span_s as usize + 2;
    assert!(
        denied.len() <= 4 * windows,
        "{} lines over {windows} windows",
        denied.len()
    );
    for summary in &summaries {
        for field in [
            "client_ip",
            "client_id",
            "email_hash",
            "limit",
            "received_at",
        ] {
            assert!(summary[field].is_string(), "{field} missing in {summary}");
        }
    }
    // The replay reads each summary as the requests it stands for.
    let mut reader = Reader::default();
    let mut replayed = 0;
    reader
        .read_all(lines.join("\n").as_bytes(), |request, _| {
            replayed += 1 + request.more as usize
        })
        .unwrap();
    assert_eq!(replayed, REQUESTS);
    assert!(reader.bad_lines.is_empty(), "{:?}", reader.bad_lines);
}

/// The access log is the record of requests, not the gateway's messages: a level raised
/// to quiet those keeps it, unless the level names it.
#[tokio::test]
async fn a_raised_log_level_keeps_the_access_log_unless_it_names_it() {
    // (The start's "serving" line, which the test waits for, is let through.)
    let lines = flood(5, "  level: warn,reset_gateway=info\n  denials: full\n").await;
    assert_eq!(lines.len(), 5, "{lines:?}");
    let lines = flood(5, "  level: warn,reset_gateway=info,access=off\n").await;
    assert!(lines.is_empty(), "{lines:?}");
}

/// At `trace`, every library's lines pass but the HTTP/2 library's, which writes the
/// target of a request it refuses (an app that did not encode a space in the address)
/// unless the level names `h2`.
#[tokio::test]
async fn no_raw_address_in_any_line_at_trace_level() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml(&mock.url(), "", "log:\n  level: trace\n")).unwrap();
    let mut gateway = spawn_gateway(&config);
    // HTTP/2 by hand, since a client library would not send that target: the preface,
    // empty SETTINGS, and one HEADERS frame of literal fields (HPACK, no Huffman coding).
    let target = format!("{RESET}?email=hidden person@example.com");
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "gateway"),
        (":path", target.as_str()),
        ("qb-token", IOS_TOKEN),
    ] {
        block.push(0);
        for text in [name, value] {
            block.push(u8::try_from(text.len()).unwrap());
            block.extend_from_slice(text.as_bytes());
        }
    }
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    bytes.extend_from_slice(&u32::try_from(block.len()).unwrap().to_be_bytes()[1..]);
    bytes.extend_from_slice(&[1, 0x05, 0, 0, 0, 1]); // HEADERS, END_STREAM | END_HEADERS, stream 1
    bytes.extend_from_slice(&block);
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    // The server's frames, up to the stream's reset (RST_STREAM, type 3): it was refused.
    let mut read = Vec::new();
    let refused = loop {
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk).await.unwrap();
        read.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        let mut types = Vec::new();
        while let Some(head) = read.get(at..at + 9) {
            types.push(head[3]);
            at +=
                9 + (usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]));
        }
        if n == 0 || types.contains(&3) {
            break types.contains(&3);
        }
    };
    assert!(refused, "{read:?}");
    drop(stream);
    gateway.signal("TERM");
    let logs = gateway.logs_to_end();
    let leaks: Vec<_> = logs.iter().filter(|l| l.contains("hidden")).collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}

/// QuickBlox refusing the server key sends no reset email, while uniform answers give
/// every client a 200: the log says so, once, not once per request.
#[tokio::test]
async fn a_refused_server_key_is_said_in_the_log() {
    let mock = MockServer::start(qb_mock::MockConfig {
        api_key: "another-applications-key".to_owned(),
        ..mock_config()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml(&mock.url(), "", "")).unwrap();
    let mut gateway = spawn_gateway(&config);
    for _ in 0..3 {
        let reply = raw(
            gateway.addr,
            format!("GET {RESET}?email={ALICE} HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(reply.status, 200, "uniform answers hide it from clients");
    }
    gateway.signal("TERM");
    let logs = gateway.logs_to_end();
    let said: Vec<_> = logs
        .iter()
        .filter(|l| l.contains("refuses the server API key"))
        .collect();
    assert_eq!(said.len(), 1, "{said:#?}");
    assert!(said[0].contains("\"level\":\"ERROR\""), "{}", said[0]);
    assert!(!said[0].contains(SERVER_KEY));
}

/// Why QuickBlox failed a request is in that request's access line (`upstream_error`), and
/// an outage is said in one warning line a second with the count, not one per request.
#[tokio::test]
async fn an_upstream_failure_is_in_its_access_line_and_an_outage_in_a_line_a_second() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    mock.set_failure(qb_mock::Failure::AbortMidBody);
    let dir = tempfile::tempdir().unwrap();
    let refused = dir.path().join("refused.yaml");
    let closed = format!("http://{}", closed_port());
    std::fs::write(&refused, yaml(&closed, "", "")).unwrap();
    let cut = dir.path().join("cut.yaml");
    std::fs::write(&cut, yaml(&mock.url(), "", "")).unwrap();
    // (A head and part of a body, then a reset: hyper reads it as a message cut short.)
    for (config, cause) in [(&refused, "connect refused"), (&cut, "connection closed")] {
        let mut gateway = spawn_gateway(config);
        for _ in 0..5 {
            let reply = raw(
                gateway.addr,
                format!("GET {RESET}?email={ALICE} HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await;
            assert_eq!(reply.status, 502);
        }
        gateway.signal("TERM");
        let logs = gateway.logs_to_end();
        let access: Vec<serde_json::Value> = logs
            .iter()
            .filter(|l| l.contains("\"target\":\"access\""))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(access.len(), 5);
        for line in &access {
            let error = line["upstream_error"].as_str().unwrap_or_default();
            assert!(error.contains(cause), "{line}");
            assert_eq!(line["outcome"], "upstream_unavailable");
        }
        let warnings: Vec<serde_json::Value> = logs
            .iter()
            .filter(|l| l.contains("upstream request failed"))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!warnings.is_empty() && warnings.len() < 5, "{warnings:#?}");
        let first = &warnings[0];
        assert_eq!(first["failed"], 1, "{first}");
        assert_eq!(first["request_id"], access[0]["request_id"], "{first}");
        assert!(first["upstream"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"));
    }
}

#[tokio::test]
async fn denials_full_logs_every_denial() {
    let lines = flood(200, "  denials: full\n").await;
    assert_eq!(lines.len(), 200);
    assert!(lines.iter().all(|l| !l.contains("\"count\"")));
}

/// A gateway in front of a QuickBlox that takes 20 s to answer, with two workers (as on
/// two cores): a drain waits on each.
async fn waiting_on_quickblox(
    grace: &str,
) -> (crate::process::Process, MockServer, tempfile::TempDir) {
    let mut config = mock_config();
    config.latency = std::time::Duration::from_secs(20);
    let mock = MockServer::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let yaml = yaml(&mock.url(), "", "")
        .replace("timeout: 400ms", "timeout: 30s")
        .replace("shutdown_grace: 5s", &format!("shutdown_grace: {grace}"));
    let server_keys = "  request_timeout: 40s\n  workers: 2\n";
    std::fs::write(&path, with_server_keys(&yaml, server_keys)).unwrap();
    (spawn_gateway(&path), mock, dir)
}

/// A reset with request id `id`, sent to `process` and waiting on QuickBlox (`mock`); the
/// connection is kept open with the returned stream.
async fn waiting_reset(
    process: &crate::process::Process,
    mock: &MockServer,
    id: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut client = tokio::net::TcpStream::connect(process.addr).await.unwrap();
    let request = format!(
        "GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\n\
         QB-Token: {IOS_TOKEN}\r\nX-Request-Id: {id}\r\n\r\n"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    quickblox_has_it(mock).await;
    client
}

/// Waits until QuickBlox has the one request sent to it.
async fn quickblox_has_it(mock: &MockServer) {
    poll_until(500, async || mock.requests().len(), |n| *n > 0).await;
    assert_eq!(mock.requests().len(), 1);
}

fn cut_line(logs: &[String], id: &str) -> Option<serde_json::Value> {
    crate::process::access_lines(logs)
        .into_iter()
        .find(|line| line["request_id"] == id)
}

/// A reset already passed on to QuickBlox (an email may be on its way) whose client left
/// before the answer is still in the log and the metrics.
#[tokio::test]
async fn a_request_whose_client_left_before_its_answer_still_gets_its_line() {
    let (process, mock, _dir) = waiting_on_quickblox("5s").await;
    // Over HTTP/2 a client gives up on one request by resetting its stream (HTTP/1.1 has no
    // such word: the gateway sees a closed connection only when it writes the answer).
    let mut sender = h2_connect(process.addr).await;
    let request = h2_reset(process.addr, "email=alice%40example.com")
        .header("x-request-id", "left-early")
        .body(http_body_util::Empty::new())
        .unwrap();
    let waiting = tokio::spawn(sender.send_request(request));
    quickblox_has_it(&mock).await;
    waiting.abort();
    let line = poll_until(
        250,
        async || cut_line(&process.logs(), "left-early"),
        Option::is_some,
    )
    .await
    .expect("an access line for the request the client left");
    assert_eq!(line["outcome"], "cut", "{line}");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
    let metrics = raw(
        process.admin,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        metrics
            .body
            .contains("reset_gateway_requests_total{outcome=\"cut\"} 1"),
        "{}",
        metrics.body
    );
}

/// A second stop signal during the drain (after the second in which it counts as the
/// same request) ends the process at once, exit 1, and the request still in flight gets
/// its `cut` line: the recording keeps it.
#[tokio::test]
async fn a_request_cut_by_a_second_stop_signal_still_gets_its_line() {
    let (mut process, mock, _dir) = waiting_on_quickblox("30s").await;
    let _client = waiting_reset(&process, &mock, "hurried").await;
    process.signal("TERM");
    poll_until(
        500,
        async || process.logs(),
        |logs| logs.iter().any(|l| l.contains("draining connections")),
    )
    .await;
    // A signal within a second of the first is the same request.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    process.signal("INT");
    let ended = tokio::task::spawn_blocking(move || {
        let status = process.child.wait().unwrap();
        (status, process.logs_to_end())
    });
    let (status, logs) = tokio::time::timeout(std::time::Duration::from_secs(15), ended)
        .await
        .expect("the second signal ends the gateway at once, not after the 30 s grace")
        .unwrap();
    assert_eq!(status.code(), Some(1), "{logs:#?}");
    let line = cut_line(&logs, "hurried").unwrap_or_else(|| panic!("no line: {logs:#?}"));
    assert_eq!(line["outcome"], "cut", "{line}");
    assert!(
        logs.iter().any(|l| l.contains("SIGINT after SIGTERM")),
        "{logs:#?}"
    );
}

/// A drain whose `shutdown_grace` runs out under a request says so in that request's line.
#[tokio::test]
async fn a_request_cut_when_the_drain_runs_out_still_gets_its_line() {
    let (mut process, mock, _dir) = waiting_on_quickblox("1s").await;
    let _client = waiting_reset(&process, &mock, "drained").await;
    process.signal("TERM");
    let logs = tokio::task::spawn_blocking(move || process.logs_to_end());
    let logs = tokio::time::timeout(std::time::Duration::from_secs(15), logs)
        .await
        .expect("the gateway ends a second after the drain starts")
        .unwrap();
    let line = cut_line(&logs, "drained").unwrap_or_else(|| panic!("no line: {logs:#?}"));
    assert_eq!(line["outcome"], "cut", "{line}");
    assert_eq!(line["status"], 499, "{line}");
}

/// A client that resets its HTTP/2 streams as fast as it opens them does not write a line
/// per stream: cut requests fold like denials.
#[tokio::test]
async fn requests_cut_in_a_burst_are_folded_into_a_summary() {
    const STREAMS: usize = 20;
    let (process, mock, _dir) = waiting_on_quickblox("5s").await;
    let sender = h2_connect(process.addr).await;
    let waiting: Vec<_> = (0..STREAMS)
        .map(|i| {
            let request = h2_reset(process.addr, &format!("email=user{i}%40example.com"))
                .body(http_body_util::Empty::new())
                .unwrap();
            tokio::spawn(sender.clone().send_request(request))
        })
        .collect();
    poll_until(500, async || mock.requests().len(), |n| *n == STREAMS).await;
    assert_eq!(mock.requests().len(), STREAMS);
    waiting.iter().for_each(|w| w.abort());
    let cut = |logs: &[String]| -> Vec<serde_json::Value> {
        let lines = crate::process::access_lines(logs).into_iter();
        lines.filter(|line| line["outcome"] == "cut").collect()
    };
    let lines = poll_until(
        250,
        async || cut(&process.logs()),
        |lines: &Vec<serde_json::Value>| lines.iter().any(|l| l.get("count").is_some()),
    )
    .await;
    // Every cut request is accounted for: a line each, or a summary's count.
    let accounted: u64 = lines.iter().map(|l| l["count"].as_u64().unwrap_or(1)).sum();
    assert_eq!(accounted, STREAMS as u64, "{lines:#?}");
    assert!(lines.len() <= 4 * 2, "{} lines: {lines:#?}", lines.len());
}
