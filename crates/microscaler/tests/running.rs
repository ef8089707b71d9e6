//! A running `microscaler run` (the real binary, on the process backend: real child
//! processes, records in the state directory) changed while it runs: `SIGHUP` reloads its
//! configuration, and producers push their triggers' values over the API.
//!
//! Reload, in one daemon's life: a service added by a reload is started and fills what is
//! left; an edited service keeps its replicas and its manual demand; a service whose settings
//! did not change keeps the very same replicas (same pids); the API shows the new services and
//! changes them; an invalid file is refused with every error's path and the running
//! configuration goes on; a change that needs a restart (the backend) is refused and named; a
//! removed service's replicas are stopped.
//!
//! Push: a push with the trigger's own token wakes the loop at once (the tick is 10 s long,
//! the replicas follow within a second), that token can do nothing else, and a value the
//! producer stops refreshing expires: the trigger reports failing and the service is held.
//! An `RPUSH` to a Redis list wakes the loop the same way, through the server's keyspace
//! notifications.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The daemon: its tick lines and its log, read by threads of their own.
struct Daemon {
    child: Child,
    ticks: mpsc::Receiver<Value>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    fn start(config: &Path, state: &Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_microscaler"))
            .args(["run", "--json", "-c"])
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .env("RUST_LOG", "info")
            .env_remove("MICROSCALER_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start microscaler run");
        let (tx, ticks) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Daemon { child, ticks, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP");
    }

    /// The first tick line (within 15 s) for which `want` holds.
    fn tick_where(&self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = Value::Null;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.ticks.recv_timeout(left) {
                Ok(t) if want(&t) => return t,
                Ok(t) => last = t,
                Err(_) => break,
            }
        }
        panic!(
            "no tick with {what} within 15 s; last tick: {last}\nlog:\n{}",
            self.log()
        );
    }

    /// The port its server listens on (the configuration asks for any free one: a port
    /// picked by the test could be taken by another before the daemon binds it), from its log.
    fn port(&self) -> u16 {
        let log = self.log_says("dashboard and API on http://");
        log.split("dashboard and API on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in the log:\n{log}"))
    }

    /// Waits (up to 15 s) until the log has `text`.
    fn log_says(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the log never said {text:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `service`'s entry in a tick line.
fn service<'a>(tick: &'a Value, name: &str) -> Option<&'a Value> {
    tick["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

fn running(tick: &Value, name: &str) -> Option<u64> {
    service(tick, name).and_then(|s| s["running"].as_u64())
}

/// The pids the process backend recorded for `service` (one record file per replica).
fn pids(state: &Path, service: &str) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(state.join(service))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn http(port: u16, req: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `PUT path` with `{"value": value}` and the bearer `token`; the whole answer.
fn put(port: u16, path: &str, token: &str, value: u32) -> String {
    let body = format!("{{\"value\": {value}}}");
    http(
        port,
        &format!(
            "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// A configuration whose server listens on any free port of the loopback interface.
fn config(backend_extra: &str, services: &str) -> String {
    format!(
        r#"
instance = "reload-{pid}"
tick = "100ms"
on_exit = "stop"
[capacity]
slots = 6
[backend]
type = "process"
{backend_extra}
[server]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[[services]]
name = "steady"
priority = 2
[[services.triggers]]
type = "manual"
initial = 1
{services}
"#,
        pid = std::process::id()
    )
}

/// The operator's API token.
const TOKEN: &str = "reload-token-0123456789";

const WEB_BEFORE: &str = r#"
[[services]]
name = "web"
priority = 1
max = 5
[[services.triggers]]
type = "manual"
"#;

const WEB_AFTER: &str = r#"
[[services]]
name = "web"
priority = 1
max = 4
[[services.triggers]]
type = "manual"
"#;

const BATCH: &str = r#"
[[services]]
name = "batch"
priority = 3
remainder = true
"#;

#[test]
fn sighup_reloads_the_configuration_and_keeps_what_did_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("microscaler.toml");
    let state = dir.path().join("state");
    std::fs::write(&file, config("", WEB_BEFORE)).unwrap();
    let d = Daemon::start(&file, &state);
    let port = d.port();
    let put = |service: &str, value: u32| {
        put(
            port,
            &format!("/api/v1/services/{service}/demand"),
            TOKEN,
            value,
        )
    };
    d.tick_where("steady running 1", |t| running(t, "steady") == Some(1));
    let answer = put("web", 2);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    d.tick_where("web running 2", |t| {
        running(t, "web") == Some(2) && running(t, "steady") == Some(1)
    });
    let steady = pids(&state, "steady");
    let web = pids(&state, "web");
    assert_eq!((steady.len(), web.len()), (1, 2));

    // Reload: web edited (max), batch added, steady untouched.
    std::fs::write(&file, config("", &format!("{WEB_AFTER}{BATCH}"))).unwrap();
    d.hangup();
    let log = d.log_says("configuration reloaded");
    assert!(
        log.contains("added batch; changed web; 1 unchanged"),
        "{log}"
    );
    // batch fills what is left of the 6 slots; web keeps its operator's demand of 2.
    d.tick_where("batch running 3, web 2, steady 1", |t| {
        running(t, "batch") == Some(3)
            && running(t, "web") == Some(2)
            && running(t, "steady") == Some(1)
    });
    assert_eq!(
        pids(&state, "steady"),
        steady,
        "the unchanged service's replicas were replaced"
    );
    assert_eq!(
        pids(&state, "web"),
        web,
        "the edited service's replicas were replaced"
    );
    // The API knows the new service and changes the edited one through its new trigger.
    let services = http(
        port,
        "GET /api/v1/services HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(services.contains("\"name\":\"batch\""), "{services}");
    let answer = put("web", 3);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    d.tick_where("web 3 and batch 2", |t| {
        running(t, "web") == Some(3) && running(t, "batch") == Some(2)
    });

    // An invalid file: refused with every error's path; the loop goes on as it was.
    std::fs::write(
        &file,
        config(
            "",
            &format!(
                "{}{BATCH}colour = \"red\"\n",
                WEB_AFTER.replace("max = 4", "max = 4\nmin = 9")
            ),
        ),
    )
    .unwrap();
    d.hangup();
    let log = d.log_says("reload refused");
    assert!(log.contains("services[1].max: must be >= min (9)"), "{log}");
    assert!(log.contains("services[2].colour"), "{log}");
    d.tick_where("the same replicas after the refused reload", |t| {
        running(t, "web") == Some(3) && running(t, "batch") == Some(2)
    });

    // A change that needs a restart: named, refused, nothing changed.
    let work = dir.path().display().to_string();
    std::fs::write(
        &file,
        config(
            &format!("work_dir = {work:?}"),
            &format!("{WEB_AFTER}{BATCH}"),
        ),
    )
    .unwrap();
    d.hangup();
    let log = d.log_says("backend: changed; restart microscaler to change it");
    assert_eq!(log.matches("reload refused").count(), 2, "{log}");

    // batch removed: its replicas are stopped, the others stay.
    std::fs::write(&file, config("", WEB_AFTER)).unwrap();
    d.hangup();
    d.log_says("removed batch");
    d.tick_where("no batch any more", |t| {
        service(t, "batch").is_none() && running(t, "web") == Some(3)
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pids(&state, "batch").is_empty() {
        assert!(
            Instant::now() < deadline,
            "batch's replicas still run: {:?}\n{}",
            pids(&state, "batch"),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pids(&state, "steady"), steady);
    assert!(d
        .log()
        .contains("removed from the configuration: its replicas are stopped"));
}

#[test]
fn a_push_wakes_the_loop_its_token_does_nothing_else_and_a_quiet_producer_expires() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("microscaler.toml");
    let token_file = dir.path().join("push-token");
    std::fs::write(&token_file, "push-token-of-the-producer\n").unwrap();
    let queue = format!(
        r#"
[[services]]
name = "worker"
priority = 1
max = 5
[[services.triggers]]
name = "queue"
type = "push"
token_file = {:?}
expires = "1500ms"
"#,
        token_file.display().to_string()
    );
    // A 10 s tick: only a wake-up explains a reaction within a second or two.
    let text = config("", &queue).replace("tick = \"100ms\"", "tick = \"10s\"");
    std::fs::write(&file, text).unwrap();
    let d = Daemon::start(&file, &dir.path().join("state"));
    let port = d.port();
    d.tick_where("the first tick", |t| service(t, "worker").is_some());
    let path = "/api/v1/services/worker/triggers/queue/value";
    let pushed = Instant::now();
    let answer = put(port, path, "push-token-of-the-producer", 3);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The woken tick starts them (the next one, 10 s later, would see them run).
    d.tick_where("worker's target 3", |t| {
        service(t, "worker").is_some_and(|s| s["target"] == 3)
    });
    let took = pushed.elapsed();
    let state = dir.path().join("state");
    assert_eq!(pids(&state, "worker").len(), 3);
    assert!(
        took < Duration::from_secs(5),
        "the push was acted on after {took:?}, as if by the 10 s tick"
    );
    // The producer's token is for its trigger only.
    let answer = put(
        port,
        "/api/v1/services/worker/demand",
        "push-token-of-the-producer",
        1,
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = put(
        port,
        "/api/v1/services/steady/random",
        "push-token-of-the-producer",
        1,
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // A wrong token: refused, and nothing pushed.
    let answer = put(port, path, "not-the-token", 0);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // The producer goes quiet: after 1.5 s its value is missing, the trigger fails and the
    // worker is held at 3 (a push of another value on steady's manual trigger wakes a tick).
    std::thread::sleep(Duration::from_millis(1700));
    let answer = put(port, "/api/v1/services/steady/demand", TOKEN, 2);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let t = d.tick_where("the push trigger failing", |t| {
        t["errors"].to_string().contains("no value pushed for")
    });
    assert_eq!(
        service(&t, "worker").unwrap()["target"],
        3,
        "held, not scaled down: {t}"
    );
    assert_eq!(pids(&state, "worker").len(), 3);
    // The log never shows the token.
    assert!(
        !d.log().contains("push-token-of-the-producer"),
        "{}",
        d.log()
    );
}

/// A push to a Redis list wakes the loop through the server's keyspace notifications (a
/// redis-server of the test's own with `notify-keyspace-events Kl`): with a 10 s tick, the
/// replicas follow an `RPUSH` within a second or two.
#[test]
fn an_rpush_wakes_the_loop_through_keyspace_notifications() {
    let Some(redis) = microscaler_testkit::redis_server("Kl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("microscaler.toml");
    let worker = format!(
        r#"
[[services]]
name = "worker"
priority = 1
max = 5
[[services.triggers]]
type = "redis_list"
url = "{}"
key = "jobs"
"#,
        redis.url
    );
    let text = config("", &worker).replace("tick = \"100ms\"", "tick = \"10s\"");
    std::fs::write(&file, text).unwrap();
    let d = Daemon::start(&file, &dir.path().join("state"));
    d.log_says("waking the loop on the list's keyspace notifications");
    d.tick_where("the first tick", |t| service(t, "worker").is_some());
    let redis_port = redis.url.rsplit(':').next().unwrap().to_string();
    let pushed = Instant::now();
    let ok = Command::new("redis-cli")
        .args(["-p", &redis_port, "RPUSH", "jobs", "a", "b"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli")
        .success();
    assert!(ok);
    d.tick_where("worker's target 2", |t| {
        service(t, "worker").is_some_and(|s| s["target"] == 2)
    });
    let took = pushed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the RPUSH was acted on after {took:?}, as if by the 10 s tick"
    );
}
