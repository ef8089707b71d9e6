//! The multi-node swarm rig (`scripts/swarm-rig.sh`, docs/swarm-rig.md): three Docker engines in
//! network namespaces of their own, one swarm (ms1 the manager, ms2 and ms3 workers), the
//! built-in replica image loaded on each with the same ID.

use std::path::PathBuf;
use std::process::{Command, Output};

use microscaler_backends::docker_api;

/// The manager's engine.
pub const MANAGER: &str = "unix:///var/run/docker-ms1.sock";

/// The engine of node `n` (1 to 3).
pub fn engine(n: u8) -> String {
    format!("unix:///var/run/docker-ms{n}.sock")
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/swarm-rig.sh")
}

fn said(o: &Output) -> String {
    format!(
        "{}{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `scripts/swarm-rig.sh args` (through `sudo -n` when not root: the rig needs root): its
/// output, or everything it said when it failed.
fn rig(args: &[&str]) -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        Command::new(script())
    } else {
        let mut c = Command::new("sudo");
        c.arg("-n").arg(script());
        c
    };
    match cmd.args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "scripts/swarm-rig.sh {}: {}",
            args.join(" "),
            said(&o)
        )),
        Err(e) => Err(format!("scripts/swarm-rig.sh {}: {e}", args.join(" "))),
    }
}

/// `docker -H <engine> args`, its standard output; panics with what it said when it fails.
pub fn docker(engine: &str, args: &[&str]) -> String {
    let o = Command::new("docker")
        .args(["-H", engine])
        .args(args)
        .output()
        .expect("the docker command");
    assert!(
        o.status.success(),
        "docker -H {engine} {}: {}",
        args.join(" "),
        said(&o)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The rig, held by one test at a time (the tests drain and kill its nodes; a file lock, so
/// that test runners that run each test in a process of its own wait too). When dropped, passed
/// or not, the instance's Swarm services are removed and the rig is brought back as it was:
/// every engine running, every node active.
pub struct Rig {
    instance: String,
    /// The built-in replica image of this build, loaded on every node.
    image: String,
    _lock: std::fs::File,
}

impl Rig {
    /// Takes the rig for `instance`'s test and starts it (idempotent: every engine running,
    /// every node Ready and active), with the built-in replica image of this build on every
    /// node. `None` when the Docker engine or the rig cannot be had: the test is then skipped,
    /// or fails under CI=true with the exact error ([`microscaler_testkit::missing_service`]).
    pub async fn take(instance: &str) -> Option<Rig> {
        let path = std::env::temp_dir().join("microscaler-swarm-rig.test-lock");
        let lock = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::create(&path).expect("the rig's test lock file");
            // SAFETY: flock on a descriptor this function owns; held until `f` is closed.
            let locked = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(
                locked,
                0,
                "lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
            f
        })
        .await
        .expect("lock");
        // The image goes from the default engine to every node (`docker save | docker load`),
        // so that its ID, which the swarm backend pins, is the same on all of them.
        let image = match docker_api::connect(None).await {
            Ok(d) => docker_api::ensure_replica_image(&d).await,
            Err(e) => Err(e),
        };
        let image = match image {
            Ok(i) => i,
            Err(e) => {
                microscaler_testkit::missing_service("the Docker engine", e);
                return None;
            }
        };
        if let Err(e) = rig(&["start", &image]) {
            microscaler_testkit::missing_service(
                "the multi-node swarm rig (scripts/swarm-rig.sh start, as root)",
                e,
            );
            return None;
        }
        Some(Rig {
            instance: instance.to_string(),
            image,
            _lock: lock,
        })
    }

    /// Node `n`'s swarm node ID.
    pub fn node_id(&self, n: u8) -> String {
        docker(&engine(n), &["info", "--format", "{{.Swarm.NodeID}}"])
    }

    /// Sets node `n`'s availability (`active`, `pause` or `drain`) on the manager.
    pub fn availability(&self, n: u8, availability: &str) {
        let id = self.node_id(n);
        docker(
            MANAGER,
            &["node", "update", "--availability", availability, &id],
        );
    }

    /// The state of the node with ID `id` as the manager sees it (`ready`, `down`, ...).
    pub fn state(&self, id: &str) -> String {
        docker(
            MANAGER,
            &["node", "inspect", "--format", "{{.Status.State}}", id],
        )
    }

    /// Node `n` leaves the swarm (`docker swarm leave` on its engine) and the manager removes
    /// it (`docker node rm --force`). [`Rig::restore`] joins it again, as a new node.
    pub fn remove(&self, n: u8) {
        let id = self.node_id(n);
        docker(&engine(n), &["swarm", "leave", "--force"]);
        docker(MANAGER, &["node", "rm", "--force", &id]);
    }

    /// Kills node `n`'s dockerd with SIGKILL (a crashed node).
    pub fn kill(&self, n: u8) {
        rig(&["kill", &n.to_string()]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts what is not running (a killed engine comes back and rejoins), joins a node that
    /// left, and makes every node active; returns once every node is Ready.
    pub fn restore(&self) {
        rig(&["start", &self.image]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Running tasks of Swarm service `service` on node `n`.
    pub fn running_on(&self, service: &str, n: u8) -> usize {
        let id = self.node_id(n);
        docker(
            MANAGER,
            &[
                "service",
                "ps",
                service,
                "--filter",
                &format!("node={id}"),
                "--filter",
                "desired-state=running",
                "--format",
                "{{.CurrentState}}",
            ],
        )
        .lines()
        .filter(|l| l.starts_with("Running"))
        .count()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let filter = format!("label=io.microscaler.instance={}", self.instance);
        let ids = Command::new("docker")
            .args(["-H", MANAGER, "service", "ls", "-q", "--filter", &filter])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["-H", MANAGER, "service", "rm"])
                .args(&ids)
                .output();
        }
        if let Err(e) = rig(&["start", &self.image]) {
            eprintln!("bringing the swarm rig back failed: {e}");
        }
    }
}
