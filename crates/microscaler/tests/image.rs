//! microscaler's own container image (built by `scripts/image.sh`, which the test command runs
//! before the tests) on the real Docker engine: the seeds' demo runs from it with the engine's
//! socket mounted, its replicas are siblings of microscaler's container on that engine, the
//! dashboard's API answers on the published port with the token the demo prints, and a
//! `docker stop` of microscaler's container removes every replica it started. The same for
//! the slim flavour (`scripts/image.sh --slim`), which also says plainly that it holds no
//! Kubernetes backend when a configuration asks for one.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use microscaler_testkit::{missing_service, unique};

const IMAGE: &str = concat!("microscaler:", env!("CARGO_PKG_VERSION"));
const SLIM: &str = concat!("microscaler:", env!("CARGO_PKG_VERSION"), "-slim");

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker command")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The replicas of `instance` on the engine: (running priority 1, running priority 2, all).
fn replicas(instance: &str) -> (usize, usize, usize) {
    let o = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=io.microscaler.instance={instance}"),
        "--format",
        "{{.State}} {{.Label \"io.microscaler.service\"}}",
    ]);
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    let running = |svc: &str| {
        lines
            .iter()
            .filter(|l| *l == &format!("running {svc}"))
            .count()
    };
    (running("priority1"), running("priority2"), lines.len())
}

/// Removes microscaler's container and the instance's replicas, passed or not.
struct Cleanup {
    container: String,
    instance: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let ids = stdout(&docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.microscaler.instance={}", self.instance),
        ]));
        let ids: Vec<&str> = ids.lines().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = docker(&args);
        }
    }
}

fn until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The size of `image` in bytes, or `None` when it is missing and the test may skip.
fn image_size(image: &str, built_by: &str) -> Option<u64> {
    let present = docker(&["image", "inspect", "-f", "{{.Size}}", image]);
    if !present.status.success() {
        let why = String::from_utf8_lossy(&present.stderr).into_owned();
        if missing_service(&format!("the image {image} ({built_by})"), why) {
            return None;
        }
    }
    Some(stdout(&present).parse().expect("image size"))
}

#[test]
fn the_demo_runs_from_the_image_with_sibling_replicas() {
    let Some(size) = image_size(IMAGE, "scripts/image.sh") else {
        return;
    };
    // The seeds' agent image was 28 MB.
    assert!(size < 28_000_000, "{IMAGE} is {size} bytes");
    demo_from(IMAGE);
}

#[test]
fn the_demo_runs_from_the_slim_image_which_names_what_it_leaves_out() {
    let Some(size) = image_size(SLIM, "scripts/image.sh --slim") else {
        return;
    };
    if let Some(full) = image_size(IMAGE, "scripts/image.sh") {
        assert!(size < full, "{SLIM} is {size} bytes, {IMAGE} {full}");
    }
    // A configuration for a backend the flavour leaves out: refused at start, by name, with
    // the way to get it; nothing is created.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let dir = dir.canonicalize().expect("the examples directory");
    let run = docker(&[
        "run",
        "--rm",
        "-v",
        &format!("{}:/examples:ro", dir.display()),
        SLIM,
        "run",
        "-c",
        "/examples/kubernetes.toml",
    ]);
    let text = format!("{}{}", stdout(&run), String::from_utf8_lossy(&run.stderr));
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains("built without the kubernetes backend"),
        "{text}"
    );
    demo_from(SLIM);
}

/// The seeds' demo from `image`: sibling replicas, the API with its token, and a `docker stop`
/// that removes them.
fn demo_from(image: &str) {
    let instance = unique("image");
    let container = format!("microscaler-{instance}");
    let _cleanup = Cleanup {
        container: container.clone(),
        instance: instance.clone(),
    };
    let run = docker(&[
        "run",
        "-d",
        "--name",
        &container,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-p",
        "127.0.0.1::8080",
        image,
        "demo",
        "--instance",
        &instance,
        "--interval",
        "1h",
    ]);
    assert!(run.status.success(), "docker run: {run:?}");
    let port = until(Duration::from_secs(20), "the published port", || {
        let o = docker(&["port", &container, "8080/tcp"]);
        stdout(&o)
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next()?.parse::<u16>().ok())
    });
    // The demo prints the dashboard's address with its token.
    let token = until(Duration::from_secs(30), "the demo's token", || {
        let logs = docker(&["logs", &container]);
        let text = format!("{}{}", stdout(&logs), String::from_utf8_lossy(&logs.stderr));
        text.lines()
            .find_map(|l| l.split("#token=").nth(1))
            .map(|t| t.trim().to_string())
    });
    // The seeds' rule from the image: priority 1 at its demand (the walk starts at 4 and
    // does not move within the hour), priority 2 filling the rest of the 9 slots, as sibling
    // containers on the engine microscaler's container talks to.
    until(Duration::from_secs(60), "4 + 5 replicas running", || {
        (replicas(&instance) == (4, 5, 9)).then_some(())
    });
    // Read from outside the container: not a loopback client, so the token is needed.
    let get = |token: Option<&str>| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
        )
        .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    };
    let refused = get(None);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let answer = get(Some(&token));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("\"instance\":\"{instance}\"")),
        "{answer}"
    );
    assert!(answer.contains("\"backend\":\"docker\""), "{answer}");

    // SIGTERM to microscaler's container: the demo removes what it started.
    let stop = docker(&["stop", "-t", "60", &container]);
    assert!(stop.status.success(), "docker stop: {stop:?}");
    let logs = docker(&["logs", &container]);
    let text = format!("{}{}", stdout(&logs), String::from_utf8_lossy(&logs.stderr));
    assert_eq!(replicas(&instance).2, 0, "replicas left behind:\n{text}");
    assert!(text.contains("stopped and removed"), "{text}");
}
