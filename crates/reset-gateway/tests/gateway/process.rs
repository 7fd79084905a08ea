//! The binary as operators run it: CLI, config errors, SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qb_mock::MockServer;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_reset-gateway");

pub fn gateway() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("RUST_LOG")
        .env_remove("RESET_GATEWAY_CONFIG");
    command
}

fn write_config(dir: &tempfile::TempDir, yaml: &str) -> std::path::PathBuf {
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn version_and_help() {
    let out = gateway().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("reset-gateway {}", env!("CARGO_PKG_VERSION"))
    );
    let out = gateway().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["check-config", "hash-token", "demo", "--config"] {
        assert!(help.contains(word), "{word} missing from --help:\n{help}");
    }
}

#[test]
fn hash_token_prints_the_digest_for_the_config() {
    let hash = |input: &[u8]| {
        let mut child = gateway()
            .arg("hash-token")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    // The token as a header carries it: surrounding spaces and a newline are not part of it.
    for input in [&b"foo\n"[..], b"  foo \t\r\n"] {
        let out = hash(input);
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
    }
    let out = hash(b"fo\no");
    assert!(!out.status.success(), "no header can carry a line break");
    assert!(String::from_utf8_lossy(&out.stderr).contains("control character"));
    let out = gateway()
        .arg("hash-token")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "an empty token must not hash");
}

/// `--config` on a command that reads no file is a usage error, not ignored, and not in
/// its help; the environment's RESET_GATEWAY_CONFIG (an image sets it for every command)
/// is not an error.
#[test]
fn a_config_given_to_a_command_that_reads_none_is_refused() {
    for args in [
        &["hash-token", "--config", "/etc/gateway.yaml"][..],
        &["--config", "/etc/gateway.yaml", "demo"],
    ] {
        let out = gateway().args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("reads no configuration file"), "{said}");
    }
    let mut child = gateway()
        .arg("hash-token")
        .env("RESET_GATEWAY_CONFIG", "/etc/gateway.yaml")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"foo\n").unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    // Their help does not offer it; a command that reads one does.
    for (command, offers) in [
        ("hash-token", false),
        ("demo", false),
        ("check-config", true),
    ] {
        let out = gateway().args([command, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command}: {help}");
        assert_eq!(help.contains("--config"), offers, "{command}: {help}");
    }
}

/// Runs `check-config` (with an API key in the environment and what `configure` adds),
/// and asserts that it accepts the configuration.
fn assert_check_config_passes(configure: impl FnOnce(&mut Command) -> &mut Command) {
    let mut command = gateway();
    command.arg("check-config").env("QB_API_KEY", "k");
    let out = configure(&mut command).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &yaml("http://127.0.0.1:9", "", ""));
    assert_check_config_passes(|command| command.arg("--config").arg(&path));
    // The variable works in place of --config.
    assert_check_config_passes(|command| command.env("RESET_GATEWAY_CONFIG", &path));
}

/// The 1-based line of the `n`th line of `text` that starts with `start`.
fn line_of_nth(text: &str, start: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.contains(start))
        .nth(n - 1)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("no {start:?} in {text}"))
}

/// SHA-256("change-me"): the placeholder client the shipped files carry.
const PLACEHOLDER_DIGEST: &str = "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f";

/// A shipped file as a deployment would write it: file-based secrets pointing at files of
/// `dir`, and with `real_token` a real client token in place of the placeholder.
pub fn deployed_copy(
    path: &std::path::Path,
    dir: &std::path::Path,
    real_token: bool,
) -> std::path::PathBuf {
    let key_file = dir.join("qb_api_key");
    std::fs::write(&key_file, "k").unwrap();
    let secret_file = dir.join("key_secret");
    std::fs::write(&secret_file, "a shared secret of some length").unwrap();
    let mut yaml = std::fs::read_to_string(path)
        .unwrap()
        .replace("/run/secrets/qb_api_key", key_file.to_str().unwrap())
        .replace("/run/secrets/key_secret", secret_file.to_str().unwrap());
    if real_token {
        let real = reset_guard::TokenDigest::of(IOS_TOKEN.as_bytes()).to_hex();
        yaml = yaml.replace(PLACEHOLDER_DIGEST, &real);
    }
    let copy = dir.join(path.file_name().unwrap());
    std::fs::write(&copy, yaml).unwrap();
    copy
}

/// `check-config` refuses a shipped file as it is, at its placeholder client.
fn assert_placeholder_refused(path: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let path = &deployed_copy(path, dir.path(), false);
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains(PLACEHOLDER_DIGEST))
        .map(|i| i + 1)
        .unwrap();
    let out = gateway()
        .args(["check-config", "--config"])
        .arg(path)
        .env("QB_API_KEY", "k")
        .env("RESET_GATEWAY_KEY_SECRET", "a shared secret of some length")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{}: {stderr}", path.display());
    assert!(
        stderr.contains(&format!("guard.clients[0].token_sha256 (line {line})"))
            && stderr.contains("hash-token"),
        "{}: {stderr}",
        path.display()
    );
}

#[test]
fn the_shipped_default_config_refuses_its_placeholder_and_is_valid_with_a_real_token() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/gateway.yaml"
    ));
    assert_placeholder_refused(path);
    let dir = tempfile::tempdir().unwrap();
    let copy = deployed_copy(path, dir.path(), true);
    assert_check_config_passes(|command| command.arg("--config").arg(&copy));
}

fn check_config_error(yaml: &str, env_key: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, yaml);
    let mut command = gateway();
    command
        .args(["check-config", "--config"])
        .arg(&path)
        .env("RESET_GATEWAY_KEY_SECRET", "a shared secret of some length")
        .env_remove("QB_API_KEY");
    if env_key {
        command.env("QB_API_KEY", "k");
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(64), "a bad config must exit 64");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.starts_with("invalid configuration: "), "{stderr}");
    stderr
}

/// `RUST_LOG` overrides `log.level`, read the same way: a bare word that is not a level
/// turned every message off (errors and refused reloads included), and is refused as
/// `log.level: warning` is; set but empty, it is not set.
#[test]
fn a_rust_log_that_is_not_a_level_is_refused_as_log_level_would_be() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &yaml("http://127.0.0.1:9", "", ""));
    let check = |rust_log: &str| {
        gateway()
            .args(["check-config", "--config"])
            .arg(&path)
            .env("QB_API_KEY", "k")
            .env("RUST_LOG", rust_log)
            .output()
            .unwrap()
    };
    for rust_log in ["warning", "access=trace,=="] {
        let out = check(rust_log);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{rust_log}: {stderr}");
        assert!(
            stderr.contains("RUST_LOG: ") && stderr.contains("overrides log.level"),
            "{rust_log}: {stderr}"
        );
    }
    for rust_log in ["", "warn,access=off", "info,reset_guard=debug"] {
        let out = check(rust_log);
        assert!(out.status.success(), "{rust_log}: {out:?}");
    }
}

#[test]
fn check_config_names_the_key_and_line() {
    let base = yaml("http://127.0.0.1:9", "", "");
    let stderr = check_config_error(&format!("{base}  responses:\n    unifrom: false\n"), true);
    let line = base.lines().count() + 2;
    assert!(
        stderr.contains(&format!("guard.responses.unifrom (line {line})")),
        "{stderr}"
    );

    let stderr = check_config_error(&base.replace("timeout: 400ms", "timeout: soon"), true);
    assert!(stderr.contains("upstream.timeout (line 9)"), "{stderr}");
    let stderr = check_config_error(
        &base.replace("connect_timeout: 400ms", "connect_timeout: 0s"),
        true,
    );
    assert!(
        stderr.contains("upstream.connect_timeout (line 10)"),
        "{stderr}"
    );

    let stderr = check_config_error(
        &base.replace("listen: 127.0.0.1:0", "listen: nowhere"),
        true,
    );
    assert!(stderr.contains("server.listen (line 2)"), "{stderr}");

    let dup = base.replace("id: web", "id: ios");
    let stderr = check_config_error(&dup, true);
    let line = line_of_nth(&dup, "- id: ios", 2);
    assert!(
        stderr.contains(&format!("guard.clients[1].id (line {line})")),
        "{stderr}"
    );

    // A key whose last name is also another key's (`url`) is found by its whole path.
    let redis = format!(
        "{base}store:\n  kind: redis\n  key_secret_env: RESET_GATEWAY_KEY_SECRET\n  redis:\n    url: http://not-redis\n"
    );
    let stderr = check_config_error(&redis, true);
    let line = line_of_nth(&redis, "    url: http://not-redis", 1);
    assert!(
        stderr.contains(&format!("store.redis.url (line {line})")),
        "{stderr}"
    );

    // Redis without a key secret: unkeyed hashes of addresses, replicas that disagree.
    let unkeyed = format!("{base}store:\n  kind: redis\n");
    let stderr = check_config_error(&unkeyed, true);
    assert!(
        stderr.contains("store.key_secret_env") && stderr.contains("key_secret_file"),
        "{stderr}"
    );

    let stderr = check_config_error(
        &base.replace(
            "  listen: 127.0.0.1:0\n  header",
            "\tlisten: 127.0.0.1:0\n  header",
        ),
        true,
    );
    assert!(
        stderr.contains("(line 2)") && stderr.contains("tab"),
        "{stderr}"
    );

    let stderr = check_config_error(&base, false);
    assert!(
        stderr.contains("upstream.api_key_env") && stderr.contains("QB_API_KEY"),
        "{stderr}"
    );
}

/// Runs `openssl` with `args` (paths among them), which must succeed.
fn openssl(args: &[&std::ffi::OsStr]) {
    let status = Command::new("openssl")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

/// A self-signed certificate for `localhost` with a new RSA key, in `dir` as `name`.pem
/// and `name`.key, with the extensions `more` adds (`-addext ...`).
fn self_signed(
    dir: &std::path::Path,
    name: &str,
    more: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let mut args: Vec<&std::ffi::OsStr> = ["req", "-x509", "-newkey", "rsa:2048", "-nodes"]
        .into_iter()
        .chain(["-days", "2", "-subj", "/CN=localhost"])
        .chain(more.iter().copied())
        .map(std::ffi::OsStr::new)
        .collect();
    args.extend([
        "-keyout".as_ref(),
        key.as_os_str(),
        "-out".as_ref(),
        cert.as_os_str(),
    ]);
    openssl(&args);
    (cert, key)
}

/// A certificate of version 3 with a critical extension the TLS library does not know (which
/// OpenSSL's clients take), and its key, in `dir`.
fn unknown_critical_extension_certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    self_signed(
        dir,
        "critical",
        &["-addext", "certificatePolicies=critical,1.2.3.4"],
    )
}

/// A certificate of X.509 version 1 and its key, in `dir`, as `openssl x509 -req` makes one
/// when given no extensions.
fn version_1_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = self_signed(dir, "v1", &[]);
    // Made again from a request of it by `x509 -req`, which adds no extensions: version 1.
    let request = dir.join("v1.csr");
    let os = std::ffi::OsStr::new;
    openssl(
        &[
            os("x509"),
            os("-x509toreq"),
            os("-in"),
            cert.as_os_str(),
            os("-signkey"),
        ]
        .into_iter()
        .chain([key.as_os_str(), os("-out"), request.as_os_str()])
        .collect::<Vec<_>>(),
    );
    openssl(
        &[
            os("x509"),
            os("-req"),
            os("-days"),
            os("2"),
            os("-in"),
            request.as_os_str(),
        ]
        .into_iter()
        .chain([
            os("-signkey"),
            key.as_os_str(),
            os("-out"),
            cert.as_os_str(),
        ])
        .collect::<Vec<_>>(),
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("Version: 1 (0x0)"));
    (cert, key)
}

/// A copy of the PEM file `ca` in `dir` with one line of its base64 left out: framed as a
/// certificate, but not one.
pub(crate) fn cut_certificate(ca: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let pem = std::fs::read_to_string(ca).unwrap();
    let kept: Vec<&str> = pem
        .lines()
        .enumerate()
        .filter(|(at, _)| *at != 4)
        .map(|(_, line)| line)
        .collect();
    let cut = dir.join("cut-ca.pem");
    std::fs::write(&cut, kept.join("\n") + "\n").unwrap();
    cut
}

#[test]
fn check_config_refuses_what_the_gateway_could_not_start_or_run_with() {
    let base = yaml("http://127.0.0.1:9", "", "");
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, other_cert, _) = test_certificates(&other);
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let cut = cut_certificate(&ca, dir.path());
    let (v1_cert, v1_key) = version_1_certificate(dir.path());
    let (critical_cert, critical_key) = unknown_critical_extension_certificate(dir.path());
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        base.replace(
            "server:\n",
            &format!(
                "server:\n  tls:\n    cert_file: {}\n    key_file: {}\n",
                cert.display(),
                key.display()
            ),
        )
    };
    let with_server = |keys: &str| with_server_keys(&base, keys);
    for (yaml, expected) in [
        (tls(&other_cert, &key), "server.tls (line 2): the key in"),
        (tls(&not_pem, &key), "server.tls.cert_file"),
        (tls(&v1_cert, &v1_key), "X.509 version 1 is not read"),
        (
            tls(&critical_cert, &critical_key),
            "(Other(OtherError(UnsupportedCriticalExtension))) (the first certificate",
        ),
        (
            base.replace(
                "upstream:\n",
                &format!("upstream:\n  ca_file: {}\n", not_pem.display()),
            ),
            "upstream.ca_file (line",
        ),
        (
            base.replace(
                "upstream:\n",
                &format!("upstream:\n  ca_file: {}\n", cut.display()),
            ),
            "upstream.ca_file (line 8): certificate 1 in",
        ),
        (
            base.replace("[User-Agent, X-Trace]", "[User-Agent, Accept-Encoding]"),
            "upstream.pass_headers[1]",
        ),
        (
            base.replace(
                "server:\n  listen: 127.0.0.1:0",
                "server:\n  listen: 127.0.0.1:8443",
            )
            .replace(
                "admin:\n  listen: 127.0.0.1:0",
                "admin:\n  listen: 0.0.0.0:8443",
            ),
            "admin.listen (line",
        ),
        (
            base.replace(
                "http://127.0.0.1:9",
                "http://user:hunter2-password@127.0.0.1:9",
            ),
            "upstream.url (line 8): must not hold credentials",
        ),
        (
            with_server("  max_header_bytes: 4096\n"),
            "server.max_header_bytes (line",
        ),
        (format!("{base}log:\n  level: verbose\n"), "log.level (line"),
        (
            format!("{base}guard:\n  clients: []\n"),
            &format!(
                "(top level) (line {}): duplicate field `guard`",
                base.lines().count() + 1
            ),
        ),
    ] {
        let stderr = check_config_error(&yaml, true);
        assert!(stderr.contains(expected), "{expected}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    // A pair that belongs together passes.
    let mut command = gateway();
    let path = write_config(&dir, &tls(&cert, &key));
    command
        .args(["check-config", "--config"])
        .arg(&path)
        .env("QB_API_KEY", "k");
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = ca;

    // A key that is set but cannot be read is not called missing.
    use std::os::unix::ffi::OsStrExt;
    let path = write_config(&dir, &base);
    let out = gateway()
        .args(["check-config", "--config"])
        .arg(&path)
        .env("QB_API_KEY", std::ffi::OsStr::from_bytes(b"\xffX"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("QB_API_KEY is not valid UTF-8"), "{stderr}");
}

#[test]
fn an_api_key_written_in_the_file_is_refused_without_echoing_it() {
    let base = yaml("http://127.0.0.1:9", "", "");
    let with_key = base.replace("upstream:\n", "upstream:\n  api_key: sk-live-0123456789\n");
    let stderr = check_config_error(&with_key, true);
    assert!(stderr.contains("upstream.api_key (line 8)"), "{stderr}");
    assert!(!stderr.contains("sk-live-0123456789"), "{stderr}");
}

#[test]
fn the_key_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "file-key\n").unwrap();
    let base = yaml("http://127.0.0.1:9", "", "");
    let yaml = base.replace(
        "upstream:\n",
        &format!(
            "upstream:\n  api_key_file: {}\n",
            dir.path().join("key").display()
        ),
    );
    let path = write_config(&dir, &yaml);
    let out = gateway()
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("QB_API_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gateway process and everything it has logged so far.
pub struct Process {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Set once everything the process wrote to stderr is in `logs`.
    pub logs_ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Process {
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The access lines logged so far, parsed.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        access_lines(&self.logs())
    }

    /// The access lines once `count` of them were logged (a few seconds at most), to
    /// assert on.
    pub async fn access_lines_once(&self, count: usize) -> Vec<serde_json::Value> {
        poll_until(
            100,
            async || self.access_lines(),
            |lines: &Vec<serde_json::Value>| lines.len() >= count,
        )
        .await
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The first line holding `text`, once logged (waited for about two seconds).
    pub async fn line_with(&self, text: &str) -> Option<String> {
        poll_until(
            100,
            async || self.logs().into_iter().find(|l| l.contains(text)),
            Option::is_some,
        )
        .await
    }

    /// Whether a line holding `text` is logged within about five seconds.
    /// The line saying a reload was rejected, once it is logged.
    pub async fn reload_rejection(&self) -> String {
        const REJECTED: &str = "configuration reload rejected";
        assert!(self.logged(REJECTED).await, "{:?}", self.logs());
        self.logs()
            .into_iter()
            .find(|l| l.contains(REJECTED))
            .unwrap()
    }

    pub async fn logged(&self, text: &str) -> bool {
        poll_until(
            250,
            async || self.logs().iter().any(|l| l.contains(text)),
            |seen| *seen,
        )
        .await
    }

    /// Waits for the process to exit, then for the last line it logged (lines written at
    /// shutdown may still be in the pipe when it exits).
    pub fn logs_to_end(&mut self) -> Vec<String> {
        let _ = self.child.wait();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.logs_ended.load(std::sync::atomic::Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the log pipe stayed open after exit"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.logs()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway process with its log piped, not waited on to serve; killed when dropped, so
/// a failing test leaves no process behind.
pub struct Unready(Child);

impl std::ops::Deref for Unready {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Unready {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Unready {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The gateway on `config`, with the server key, its log piped to the test.
fn gateway_on(config: &std::path::Path) -> Command {
    let mut command = gateway();
    command
        .arg("--config")
        .arg(config)
        .env("QB_API_KEY", SERVER_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

pub fn spawn_unready(config: &std::path::Path) -> Unready {
    Unready(gateway_on(config).spawn().unwrap())
}

/// Starts the binary and waits for its "serving" log line.
pub fn spawn_gateway(config: &std::path::Path) -> Process {
    let mut child = gateway_on(config).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (addr, admin) = loop {
        let line = lines
            .next()
            .expect("the gateway logged that it serves")
            .unwrap();
        logs.lock().unwrap().push(line.clone());
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
            if json["message"] == "serving" {
                break (
                    json["listen"].as_str().unwrap().parse().unwrap(),
                    json["admin"].as_str().unwrap().parse().unwrap(),
                );
            }
        }
    };
    let sink = logs.clone();
    let logs_ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended = logs_ended.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
        ended.store(true, std::sync::atomic::Ordering::Release);
    });
    Process {
        child,
        addr,
        admin,
        logs,
        logs_ended,
    }
}

/// Supervisors send SIGHUP as soon as a service reports started; one that arrived before the
/// handler was installed took the default action and ended the process.
#[tokio::test]
async fn a_signal_sent_as_soon_as_the_gateway_serves_is_handled_not_fatal() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &yaml(&mock.url(), "", ""));
    let mut gateways: Vec<Process> = (0..4).map(|_| spawn_gateway(&path)).collect();
    for gateway in &gateways {
        gateway.signal("HUP");
    }
    // Caught already when "serving" was logged: the kernel's mask of caught signals
    // (SIGHUP is bit 0, SIGINT bit 1, SIGTERM bit 14).
    let spawned = spawn_gateway(&path);
    let status = std::fs::read_to_string(format!("/proc/{}/status", spawned.child.id())).unwrap();
    let caught = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
        .unwrap();
    for (name, bit) in [("HUP", 0), ("INT", 1), ("TERM", 14)] {
        assert!(caught & (1 << bit) != 0, "SIG{name} is not caught yet");
    }
    spawned.signal("HUP");
    gateways.push(spawned);
    for gateway in &mut gateways {
        let reloaded = gateway.logged("configuration reloaded").await;
        assert!(
            reloaded,
            "exit status {:?}, logs {:?}",
            gateway.child.try_wait(),
            gateway.logs()
        );
        assert_eq!(gateway.child.try_wait().unwrap(), None, "still running");
    }
    let mut gateway = gateways.pop().unwrap();
    gateway.signal("TERM");
    let status = tokio::task::spawn_blocking(move || gateway.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM drains and exits 0");
}

/// A SIGHUP that comes while the gateway still reads its configuration (a supervisor's
/// reload right after start) is caught, not fatal, and honoured once it serves.
#[tokio::test]
async fn a_sighup_before_the_gateway_serves_is_kept_for_later() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The key secret file is a pipe: reading the configuration waits on it, so the signal
    // surely comes before the gateway has read its configuration.
    let secret = dir.path().join("key_secret");
    assert!(Command::new("mkfifo")
        .arg(&secret)
        .status()
        .unwrap()
        .success());
    let path = write_config(
        &dir,
        &yaml(
            &mock.url(),
            "",
            &format!("store:\n  key_secret_file: {}\n", secret.display()),
        ),
    );
    let mut child = spawn_unready(&path);
    // Sent as soon as the process catches it, while it waits for the pipe.
    let caught = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .unwrap();
        u64::from_str_radix(mask.trim(), 16).unwrap() & 1 != 0
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !caught() {
        assert!(std::time::Instant::now() < deadline, "SIGHUP never caught");
        std::thread::yield_now();
    }
    assert!(Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    // The secret, then a plain file in the pipe's place for the reload to read.
    let secret_text = "a-key-secret-of-enough-length\n";
    std::fs::write(&secret, secret_text).unwrap();
    let plain = dir.path().join("key_secret.plain");
    std::fs::write(&plain, secret_text).unwrap();
    std::fs::rename(&plain, &secret).unwrap();
    let (sender, received) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut lines = Vec::new();
    let seen = |lines: &[String], what: &str| lines.iter().any(|l| l.contains(what));
    while let Ok(line) = received.recv_timeout(Duration::from_secs(10)) {
        lines.push(line);
        if seen(&lines, "configuration reloaded") && seen(&lines, "\"serving\"") {
            break;
        }
    }
    assert_eq!(child.try_wait().unwrap(), None, "still running: {lines:?}");
    assert!(
        seen(&lines, "configuration reloaded"),
        "the early SIGHUP was honoured: {lines:?}"
    );
    assert!(seen(&lines, "\"serving\""), "{lines:?}");
}

/// An operator who signals again while the gateway drains wants it gone now.
#[tokio::test]
async fn a_second_sigterm_while_draining_stops_at_once() {
    let mut config = mock_config();
    config.latency = Duration::from_secs(20);
    let mock = MockServer::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &with_server_keys(
            &yaml(&mock.url(), "", "")
                .replace("timeout: 400ms", "timeout: 30s")
                .replace("shutdown_grace: 5s", "shutdown_grace: 60s"),
            "  request_timeout: 40s\n",
        ),
    );
    let mut process = spawn_gateway(&path);
    let addr = process.addr;
    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    let _in_flight = tokio::spawn(async move { raw(addr, request.as_bytes()).await });
    poll_until(500, async || mock.requests().len(), |n| *n > 0).await;
    process.signal("TERM");
    process.logged("draining connections").await;
    // At once again: a process manager forwarding the same stop, not a second request.
    process.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(process.child.try_wait().unwrap(), None, "still draining");
    // Then again, a second on: this one means it.
    let pid = process.child.id().to_string();
    let repeat = std::thread::spawn(move || {
        for _ in 0..50 {
            let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            if !sent.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let logs = tokio::task::spawn_blocking(move || {
        let logs = process.logs_to_end();
        (process.child.wait().unwrap(), logs)
    });
    let (status, logs) = tokio::time::timeout(Duration::from_secs(10), logs)
        .await
        .expect("gone well before the 20s request or the 60s grace")
        .unwrap();
    assert_eq!(status.code(), Some(1), "not a clean drain: {logs:?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("SIGTERM received after SIGTERM")),
        "{logs:?}"
    );
    repeat.join().unwrap();
}

/// Lines the gateway cannot write because the reader of its log has gone are counted as
/// dropped, and serving goes on.
#[tokio::test]
async fn log_lines_nobody_reads_are_counted_as_dropped() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &yaml(&mock.url(), "", ""));
    let mut child = spawn_unready(&path);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (addr, admin) = loop {
        let line = lines
            .next()
            .expect("the gateway logged that it serves")
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if json["message"] == "serving" {
            break (
                json["listen"].as_str().unwrap().parse().unwrap(),
                json["admin"].as_str().unwrap().parse().unwrap(),
            );
        }
    };
    drop(lines);
    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    let dropped = poll_until(
        250,
        async || {
            assert_eq!(raw(addr, request.as_bytes()).await.status, 200);
            let metrics = raw(
                admin,
                b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await
            .body;
            sample(&metrics, "reset_gateway_log_lines_dropped_total")
        },
        |n| n.unwrap_or(0.0) > 0.0,
    )
    .await;
    assert!(dropped.unwrap() > 0.0);
}

/// A reader that has gone (`| head`, a closed pipe) is a failed write, not a panic (exit 101).
#[test]
fn output_nobody_reads_fails_the_command_without_a_panic() {
    let closed_pipe = |command: &mut Command, stream: &str| {
        let mut command = command;
        command = match stream {
            "stdout" => command.stdout(Stdio::piped()).stderr(Stdio::null()),
            _ => command.stderr(Stdio::piped()).stdout(Stdio::null()),
        };
        let mut child = command.stdin(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        drop(child.stderr.take());
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"token\n");
        drop(stdin);
        child.wait().unwrap().code()
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = write_config(&dir, "nonsense: 1\n");
    assert_eq!(
        closed_pipe(
            gateway().arg("--config").arg(&bad).arg("check-config"),
            "stderr"
        ),
        Some(64),
        "the configuration's verdict, not a panic"
    );
    assert_eq!(
        closed_pipe(gateway().arg("hash-token"), "stdout"),
        Some(1),
        "the digest was not delivered"
    );
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let mut config = mock_config();
    config.latency = Duration::from_millis(800);
    let mock = MockServer::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &yaml(&mock.url(), "", "").replace("timeout: 400ms", "timeout: 5s"),
    );
    let process = spawn_gateway(&path);
    let addr = process.addr;

    let request = format!("GET {RESET}?email=alice%40example.com HTTP/1.1\r\nHost: x\r\nQB-Token: {IOS_TOKEN}\r\nConnection: close\r\n\r\n");
    let in_flight = tokio::spawn(async move { raw(addr, request.as_bytes()).await });
    // The request is in flight once QuickBlox has it (it answers 800ms later).
    while mock.requests().is_empty() {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    process.signal("TERM");
    // While draining, readiness fails so load balancers stop sending traffic (the signal is
    // handled asynchronously: ask until it shows, the in-flight request lasts 800ms).
    let mut ready = raw(
        process.admin,
        b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    for _ in 0..50 {
        if ready.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        ready = raw(
            process.admin,
            b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
    }
    assert_eq!((ready.status, ready.body.as_str()), (503, "draining\n"));

    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request completed");
    let mut process = process;
    let status = tokio::task::spawn_blocking(move || process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // And it no longer accepts.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[test]
fn every_example_config_is_valid_once_its_placeholder_is_replaced() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/examples");
    let deployed = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        assert_placeholder_refused(&path);
        let copy = deployed_copy(&path, deployed.path(), true);
        let out = gateway()
            .args(["check-config", "--config"])
            .arg(&copy)
            .env("QB_API_KEY", "k")
            .env("RESET_GATEWAY_KEY_SECRET", "a shared secret of some length")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[tokio::test]
async fn health_asks_the_admin_listener_the_config_names() {
    let mock = MockServer::start(mock_config()).await.unwrap();
    let admin = closed_port();
    let yaml = yaml(&mock.url(), "", "").replace(
        "admin:\n  listen: 127.0.0.1:0",
        &format!("admin:\n  listen: {admin}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &yaml);
    let health = || {
        gateway()
            .args(["health", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = health();
    assert_eq!(out.status.code(), Some(1), "nothing listens yet");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("not ready: "));

    let _gateway = spawn_gateway(&path);
    let out = health();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ready: {admin}")
    );
}

#[test]
fn every_key_the_shipped_config_shows_commented_out_is_a_key_the_gateway_knows() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/gateway.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut uncommented = 0;
    let yaml: String = text
        .lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let rest = line.trim_start();
            // `# name: value` or `# name:`, where name is a key's shape (not prose, not a URL).
            let key = rest.strip_prefix("# ").filter(|r| {
                r.trim_start().split_once(':').is_some_and(|(name, value)| {
                    !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        && (value.is_empty() || value.starts_with(' '))
                })
            });
            match key {
                Some(key) => {
                    uncommented += 1;
                    format!("{indent}{key}\n")
                }
                None => format!("{line}\n"),
            }
        })
        .collect();
    assert!(uncommented >= 10, "{uncommented} keys found commented out");
    // Parsing alone: unknown keys are refused here, before any file or variable is read.
    if let Err(error) = reset_gateway::GatewayConfig::from_yaml(&yaml) {
        panic!("a documented key is refused: {error}\n{yaml}");
    }
}

/// The access lines among `logs`, parsed.
pub fn access_lines(logs: &[String]) -> Vec<serde_json::Value> {
    logs.iter()
        .filter(|l| l.contains("\"target\":\"access\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Under an open-file limit that cannot hold `server.max_connections` (here 300 files
/// for 1000 connections, the hard limit as low), the gateway says so at start, and
/// serves. Under a soft limit below a higher hard one it raises its own and says nothing.
#[test]
fn an_open_file_limit_short_of_max_connections_is_warned_of_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = with_server_keys(
        &yaml("http://127.0.0.1:9", "", ""),
        "  max_connections: 1000\n",
    );
    let path = write_config(&dir, &yaml);
    let start_under = |ulimit: &str| {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit {ulimit} && exec \"$0\" --config \"$1\""))
            .arg(BIN)
            .arg(&path)
            .env_remove("RUST_LOG")
            .env("QB_API_KEY", SERVER_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = Vec::new();
        for line in BufReader::new(child.stderr.take().unwrap()).lines() {
            let line = line.unwrap();
            let serving = line.contains("\"serving\"");
            lines.push(line);
            if serving {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        lines
    };
    let short = start_under("-n 300");
    assert!(short.last().unwrap().contains("\"serving\""), "{short:?}");
    let warning = short
        .iter()
        .find(|l| l.contains("fewer files than server.max_connections client connections"))
        .unwrap_or_else(|| panic!("no warning: {short:?}"));
    assert!(warning.contains("\"open_files\":300"), "{warning}");
    let raised = start_under("-S -n 300 && ulimit -H -n 4096");
    assert!(raised.last().unwrap().contains("\"serving\""), "{raised:?}");
    assert!(
        !raised.iter().any(|l| l.contains("max_connections")),
        "{raised:?}"
    );
}

/// rustls warns of every TLS client that sends an IP address as its server name (wrk,
/// `openssl s_client`, scanners do): a line per handshake that no log should carry by
/// default. Such clients are served, and leave no line.
#[test]
fn tls_clients_naming_an_ip_address_leave_no_warning_per_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = test_certificates(dir.path());
    let yaml = yaml("http://127.0.0.1:9", "", "").replace(
        "server:\n",
        &format!(
            "server:\n  tls:\n    cert_file: {}\n    key_file: {}\n",
            cert.display(),
            key.display()
        ),
    );
    let path = write_config(&dir, &yaml);
    let mut gateway = spawn_gateway(&path);
    for _ in 0..3 {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &gateway.addr.to_string()])
            .args(["-servername", "127.0.0.1"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl is installed");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("BEGIN CERTIFICATE"), "{said}");
    }
    gateway.signal("TERM");
    let logs = gateway.logs_to_end();
    assert!(!logs.iter().any(|l| l.contains("SNI")), "{logs:#?}");
}
