//! The local process backend: each replica is a child process of the daemon, no container
//! engine needed. It is the embedded default when no Docker engine answers, so the demo runs on
//! any Linux machine.
//!
//! What it guarantees:
//! - A replica runs `run.command` (program and arguments, never through a shell), or the
//!   built-in replica ([`crate::docker_api::REPLICA_BINARY`], written once to
//!   `{state_dir}/replica`) when the command is empty.
//! - A replica sees exactly `run.env` plus `MICROSCALER_SERVICE` and `MICROSCALER_INSTANCE`:
//!   the daemon's own environment (credentials) never reaches it. Its stdout and stderr are
//!   appended to `{state_dir}/{service}.log`; stdin is null.
//! - Each replica leads its own process group, so a Ctrl-C on the daemon's terminal does not
//!   reach the replicas: microscaler stops them itself, with SIGTERM, then SIGKILL after the
//!   service's `stop_grace`. Signals go to the replica's process group, so the children of a
//!   wrapper (a shell running `sleep`) stop with it.
//! - Every child is reaped: stopped replicas are waited for, replicas that exit by themselves
//!   are reaped by the next `observe` or `scale`.
//! - Each replica is recorded as `{state_dir}/{service}/{pid}` with its start time (field 22 of
//!   `/proc/{pid}/stat`) and the boot id, so a restarted daemon adopts the replicas that are
//!   still alive, and a reused pid is never mistaken for a replica.
//! - Only processes in the backend's books (started by it, or adopted from its own records for
//!   this instance) are ever signalled.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use microscaler_core::plugin::{Capabilities, ServiceContext};
use microscaler_core::validate::join;
use microscaler_core::{Host, Resources, ServiceName, ServiceObservation, Validator};
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::config::{Service, Workload};
use crate::docker_api::REPLICA_BINARY;
use crate::{
    managed, Backend, BackendError, Observation, Replica, ReplicaState, ScaleOutcome, StartFailure,
};

// ---------------------------------------------------------------------------------------------
// Configuration: `[backend] type = "process"` and what a service gives it.

/// `[backend] type = "process"`: replicas are local child processes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProcessConfig {
    /// Working directory of the replicas; `None` means the daemon's.
    pub work_dir: Option<String>,
    /// What the machine gives to microscaler's replicas, instead of all its CPUs and memory
    /// (`allocatable = { cpu = "2", memory = "4Gi" }`), for `[capacity] resources = true` on
    /// a machine shared with other work.
    pub allocatable: Option<Resources>,
}

#[derive(Deserialize)]
struct RawProcess {
    work_dir: Option<String>,
    allocatable: Option<toml::Value>,
}

/// What the process backend can do: it stops its replicas itself and reports the machine's
/// CPUs and memory (no pause yet).
pub const CAPABILITIES: Capabilities = Capabilities {
    host_resources: true,
    ..Capabilities::CONTAINER_LEVEL
};

impl ProcessConfig {
    /// Validates the `[backend]` section (without `type`) at `path`. Whether `work_dir` exists
    /// is checked when the backend is built, not here (validation touches no file).
    pub fn validate(options: toml::Value, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawProcess = v.part(options, path)?;
        if r.work_dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            v.err(join(path, "work_dir"), "must not be empty");
        }
        let allocatable = match r.allocatable {
            None => None,
            Some(raw) => Some(v.resources(raw, &join(path, "allocatable"))?),
        };
        Some(ProcessConfig {
            work_dir: r.work_dir,
            allocatable,
        })
    }

    /// Validates a service's own keys for this backend: `command` and `env` (a process runs
    /// no image).
    pub fn workload(
        mut options: toml::Table,
        _: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        if options.remove("image").is_some() {
            v.err(
                join(path, "image"),
                "not used by the process backend; set command = [program, args...] instead",
            );
        }
        let run = Workload::managed_only("process", options, v, path)?;
        if run.command.first().is_some_and(|c| c.is_empty()) {
            v.err(join(path, "command[0]"), "the program must not be empty");
        }
        Some(Workload::Managed(run))
    }
}

/// Grace used by `shutdown(remove = true)` for replicas of a service that is no longer
/// configured (adopted from an earlier run's records).
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a replica to disappear after SIGKILL before reporting it stuck (a
/// process in uninterruptible sleep cannot die until its I/O returns).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for an adopted replica (not our child) to exit.
const POLL: Duration = Duration::from_millis(20);
/// A spawn of a binary that was just written can fail with ETXTBSY while another thread's
/// freshly forked child still holds the write descriptor; it clears within milliseconds.
const TXTBSY_RETRIES: u32 = 20;

/// The local process backend. See the [module documentation](self) for what it guarantees.
pub struct ProcessBackend {
    inner: Arc<Inner>,
}

struct Inner {
    instance: String,
    state_dir: PathBuf,
    work_dir: Option<PathBuf>,
    /// `[backend] allocatable`, else the machine's CPUs and memory.
    allocatable: Option<Resources>,
    hostname: String,
    boot_id: String,
    books: Mutex<Books>,
    /// Path of the built-in replica once written (it is written once per backend).
    replica: Mutex<Option<PathBuf>>,
    /// One lock per service, so two `scale` calls on the same service never overshoot.
    scale_locks: Mutex<BTreeMap<ServiceName, Arc<tokio::sync::Mutex<()>>>>,
}

/// Every replica the backend owns, per service, oldest first.
#[derive(Default)]
struct Books {
    next_seq: u64,
    services: BTreeMap<ServiceName, Vec<Entry>>,
}

struct Entry {
    pid: u32,
    /// Field 22 of `/proc/{pid}/stat`: guards against pid reuse.
    start_time: u64,
    /// Start order: the highest is stopped first.
    seq: u64,
    proc: Proc,
}

enum Proc {
    /// Started by this backend: our child, signalled and reaped through its handle.
    Child(tokio::process::Child),
    /// Recorded by an earlier run of this instance: not our child any more, so it is stopped by
    /// signalling it and polling `/proc` (init reaps it).
    Adopted,
    /// Handed to a stop task.
    Stopping,
}

/// What a stop task works on.
enum Handle {
    Child(tokio::process::Child),
    Adopted,
}

impl ProcessBackend {
    /// Builds the backend. `instance` is the owning microscaler instance (recorded with every
    /// replica, so only this instance's replicas are adopted); `state_dir` holds the replica
    /// records, the per-service logs and the built-in replica binary, and is created if missing.
    pub fn new(
        spec: &ProcessConfig,
        instance: &str,
        state_dir: PathBuf,
    ) -> Result<ProcessBackend, BackendError> {
        fs::create_dir_all(&state_dir).map_err(|e| BackendError::Api {
            op: format!(
                "create the process backend's state directory {}",
                state_dir.display()
            ),
            message: format!("{e}; make it writable or choose another state directory"),
        })?;
        let work_dir = match &spec.work_dir {
            Some(dir) => {
                let path = PathBuf::from(dir);
                match fs::metadata(&path) {
                    Ok(m) if m.is_dir() => Some(path),
                    Ok(_) => {
                        return Err(BackendError::Unsupported(format!(
                            "backend.work_dir {dir:?} is not a directory: point it at a directory \
                             or remove it to run replicas in the daemon's working directory"
                        )))
                    }
                    Err(e) => {
                        return Err(BackendError::Unsupported(format!(
                            "backend.work_dir {dir:?} cannot be used: {e}; create it or fix \
                             backend.work_dir"
                        )))
                    }
                }
            }
            None => None,
        };
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        Ok(ProcessBackend {
            inner: Arc::new(Inner {
                instance: instance.to_string(),
                state_dir,
                work_dir,
                allocatable: spec.allocatable,
                hostname,
                boot_id: boot_id(),
                books: Mutex::new(Books::default()),
                replica: Mutex::new(None),
                scale_locks: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// The directory holding the records, logs and the built-in replica.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The log file the replicas of `service` append their stdout and stderr to.
    pub fn log_path(&self, service: &ServiceName) -> PathBuf {
        self.inner.log_path(service)
    }
}

impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn prepare(&self, services: &[Service]) -> Result<(), BackendError> {
        if services.iter().any(|s| managed(s).command.is_empty()) {
            self.inner.ensure_replica()?;
        }
        self.inner.adopt(services)
    }

    /// Adoption only reads the state directory (and forgets the records of replicas that are
    /// gone); the built-in replica is not written.
    async fn prepare_dry_run(&self, services: &[Service]) -> Result<(), BackendError> {
        if services.iter().any(|s| managed(s).command.is_empty()) {
            tracing::info!("dry run: would write the built-in replica into the state directory");
        }
        self.inner.adopt(services)
    }

    async fn observe(&self) -> Result<Observation, BackendError> {
        let inner = &self.inner;
        let mut obs = Observation {
            hosts: vec![inner.host()],
            ..Default::default()
        };
        let mut books = inner.books();
        inner.reap(&mut books, None);
        for (name, entries) in &books.services {
            let running = entries
                .iter()
                .filter(|e| !matches!(e.proc, Proc::Stopping))
                .count() as u32;
            obs.services
                .insert(name.clone(), ServiceObservation::counts(running, 0));
            obs.replicas.extend(entries.iter().map(|e| Replica {
                id: e.pid.to_string(),
                service: name.clone(),
                host: inner.hostname.as_str().into(),
                state: match e.proc {
                    Proc::Stopping => ReplicaState::Stopping,
                    _ => ReplicaState::Running,
                },
            }));
        }
        Ok(obs)
    }

    async fn scale(&self, service: &Service, target: u32) -> Result<ScaleOutcome, BackendError> {
        let lock = self.inner.scale_lock(&service.name);
        let _serialised = lock.lock().await;
        let live = {
            let mut books = self.inner.books();
            self.inner.reap(&mut books, Some(&service.name));
            books.services.get(&service.name).map_or(0, |entries| {
                entries
                    .iter()
                    .filter(|e| !matches!(e.proc, Proc::Stopping))
                    .count() as u32
            })
        };
        let mut outcome = ScaleOutcome::default();
        if live < target {
            self.inner.start(service, target - live, &mut outcome).await;
        } else if live > target {
            outcome.stopped = stop_newest(&self.inner, service, live - target).await?;
        }
        Ok(outcome)
    }

    async fn shutdown(&self, services: &[Service], remove: bool) -> Result<(), BackendError> {
        let inner = &self.inner;
        if !remove {
            let mut books = inner.books();
            inner.reap(&mut books, None);
            let left: usize = books.services.values().map(Vec::len).sum();
            info!(
                replicas = left,
                state_dir = %inner.state_dir.display(),
                "leaving replicas running for the next start to adopt"
            );
            return Ok(());
        }
        let graces: BTreeMap<&ServiceName, Duration> =
            services.iter().map(|s| (&s.name, s.stop_grace)).collect();
        let names: Vec<ServiceName> = inner.books().services.keys().cloned().collect();
        let stops = names.iter().map(|name| {
            let grace = graces.get(name).copied().unwrap_or(DEFAULT_STOP_GRACE);
            stop_all_of(inner, name, grace)
        });
        let errors: Vec<String> = futures::future::join_all(stops)
            .await
            .into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect();
        if errors.is_empty() {
            info!("stopped every replica");
            Ok(())
        } else {
            Err(BackendError::Api {
                op: "stop all replicas on shutdown".into(),
                message: errors.join("; "),
            })
        }
    }
}

impl Inner {
    fn books(&self) -> MutexGuard<'_, Books> {
        // A panic while holding the lock leaves the books consistent (every change is a single
        // push or remove), so a poisoned lock is still usable.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn scale_lock(&self, service: &ServiceName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.scale_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(service.clone()).or_default().clone()
    }

    fn log_path(&self, service: &ServiceName) -> PathBuf {
        self.state_dir.join(format!("{service}.log"))
    }

    fn record_path(&self, service: &ServiceName, pid: u32) -> PathBuf {
        self.state_dir.join(service.as_str()).join(pid.to_string())
    }

    fn host(&self) -> Host {
        Host {
            id: self.hostname.as_str().into(),
            name: self.hostname.clone(),
            ready: true,
            cpus: match self.allocatable {
                Some(a) => Some(a.cpu_milli as f64 / 1000.0),
                None => std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as f64),
            },
            memory_bytes: match self.allocatable {
                Some(a) => Some(a.memory),
                None => mem_total(),
            },
        }
    }

    /// Writes the built-in replica to `{state_dir}/replica` once per backend, through a
    /// temporary file and a rename: a replica still running the previous binary keeps its
    /// inode, and no reader ever sees a half-written file.
    fn ensure_replica(&self) -> Result<PathBuf, BackendError> {
        let mut slot = self.replica.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &*slot {
            return Ok(path.clone());
        }
        let path = self.state_dir.join("replica");
        // Unique per process and per backend, so two backends sharing a state directory never
        // write through the same temporary file.
        static TMP: AtomicU64 = AtomicU64::new(0);
        let tmp = self.state_dir.join(format!(
            "{REPLICA_TMP}{}-{}",
            std::process::id(),
            TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o755)
                .open(&tmp)?;
            f.write_all(REPLICA_BINARY)?;
            // The mode given to open is filtered by the umask.
            f.set_permissions(fs::Permissions::from_mode(0o755))?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(BackendError::Api {
                op: format!("write the built-in replica to {}", path.display()),
                message: format!("{e}; make the state directory writable"),
            });
        }
        debug!(path = %path.display(), bytes = REPLICA_BINARY.len(), "built-in replica written");
        *slot = Some(path.clone());
        Ok(path)
    }

    /// Adopts the recorded replicas of this instance that are still alive; forgets the stale
    /// records. Idempotent: a replica already in the books is left as it is.
    fn adopt(&self, services: &[Service]) -> Result<(), BackendError> {
        let dir = fs::read_dir(&self.state_dir).map_err(|e| BackendError::Api {
            op: format!("read the state directory {}", self.state_dir.display()),
            message: format!("{e}; make it readable or choose another state directory"),
        })?;
        let mut found: Vec<(ServiceName, Record)> = Vec::new();
        for entry in dir.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if stale_replica_tmp(&file) {
                debug!(file = %entry.path().display(), "removing a built-in replica left half-written by a process that is gone");
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(name) = ServiceName::try_new(&file) else {
                continue;
            };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(records) = fs::read_dir(entry.path()) else {
                continue;
            };
            for rec in records.flatten() {
                let file = rec.file_name().to_string_lossy().into_owned();
                if file.starts_with('.') && file.ends_with(".tmp") {
                    // Left by a crash while writing a record.
                    let _ = fs::remove_file(rec.path());
                    continue;
                }
                let Ok(pid) = file.parse::<u32>() else {
                    continue;
                };
                let record = fs::read_to_string(rec.path())
                    .ok()
                    .and_then(|text| Record::parse(&text));
                let Some(record) = record.filter(|r| r.pid == pid) else {
                    warn!(record = %rec.path().display(), "unreadable replica record; forgetting it");
                    let _ = fs::remove_file(rec.path());
                    continue;
                };
                if record.instance != self.instance {
                    debug!(record = %rec.path().display(), owner = %record.instance,
                        "record of another instance; leaving it alone");
                    continue;
                }
                let same_boot = record.boot_id.is_empty()
                    || self.boot_id.is_empty()
                    || record.boot_id == self.boot_id;
                if same_boot && is_alive(pid, record.start_time) {
                    found.push((name.clone(), record));
                } else {
                    debug!(service = %name, pid, "replica of an earlier run is gone; forgetting its record");
                    let _ = fs::remove_file(rec.path());
                }
            }
        }
        found.sort_by_key(|(_, r)| (r.start_time, r.pid));
        let mut books = self.books();
        let mut adopted = 0;
        for (name, record) in found {
            let known = books
                .services
                .get(&name)
                .is_some_and(|es| es.iter().any(|e| e.pid == record.pid));
            if known {
                continue;
            }
            if !services.iter().any(|s| s.name == name) {
                warn!(service = %name, pid = record.pid,
                    "adopted a replica of a service that is no longer configured; it is stopped only by shutdown with removal");
            }
            info!(service = %name, pid = record.pid, "adopted a replica of an earlier run");
            let seq = books.next_seq;
            books.next_seq += 1;
            books.services.entry(name).or_default().push(Entry {
                pid: record.pid,
                start_time: record.start_time,
                seq,
                proc: Proc::Adopted,
            });
            adopted += 1;
        }
        if adopted > 0 {
            info!(
                replicas = adopted,
                instance = %self.instance,
                "adopted replicas of an earlier run"
            );
        }
        Ok(())
    }

    /// Removes the replicas that exited by themselves from the books (reaping our children) and
    /// deletes their records. `only` limits it to one service.
    fn reap(&self, books: &mut Books, only: Option<&ServiceName>) {
        for (name, entries) in books.services.iter_mut() {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            entries.retain_mut(|e| {
                let gone = match &mut e.proc {
                    Proc::Child(child) => match child.try_wait() {
                        Ok(Some(status)) => {
                            warn!(service = %name, pid = e.pid, status = %status, "replica exited");
                            true
                        }
                        Ok(None) => false,
                        Err(err) => {
                            warn!(service = %name, pid = e.pid, error = %err, "cannot check a replica's status");
                            false
                        }
                    },
                    Proc::Adopted => {
                        let gone = !is_alive(e.pid, e.start_time);
                        if gone {
                            warn!(service = %name, pid = e.pid, "adopted replica exited");
                        }
                        gone
                    }
                    Proc::Stopping => false,
                };
                if gone {
                    let _ = fs::remove_file(self.record_path(name, e.pid));
                }
                !gone
            });
        }
        books.services.retain(|_, entries| !entries.is_empty());
    }

    /// Starts `count` replicas of `service`; failures go to `outcome.failures`.
    async fn start(&self, service: &Service, count: u32, outcome: &mut ScaleOutcome) {
        let name = &service.name;
        let fail = |outcome: &mut ScaleOutcome, n: u32, message: String| {
            warn!(service = %name, replicas = n, error = %message, "cannot start replicas");
            for _ in 0..n {
                outcome.failures.push(StartFailure {
                    service: name.clone(),
                    message: message.clone(),
                });
            }
        };
        let (program, args): (PathBuf, &[String]) = match managed(service).command.split_first() {
            Some((program, args)) => (PathBuf::from(program), args),
            None => match self.ensure_replica() {
                Ok(path) => (path, &[]),
                Err(e) => return fail(outcome, count, e.to_string()),
            },
        };
        let log_path = self.log_path(name);
        let log = match fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
        {
            Ok(f) => f,
            Err(e) => {
                let msg = format!(
                    "cannot open the log file {} of service {name}: {e}; make the state directory writable",
                    log_path.display()
                );
                return fail(outcome, count, msg);
            }
        };
        let record_dir = self.state_dir.join(name.as_str());
        if let Err(e) = fs::create_dir_all(&record_dir) {
            let msg = format!(
                "cannot create the record directory {}: {e}; make the state directory writable",
                record_dir.display()
            );
            return fail(outcome, count, msg);
        }
        for _ in 0..count {
            match self.spawn_one(service, &program, args, &log).await {
                Ok((child, pid, start_time)) => {
                    let mut books = self.books();
                    let seq = books.next_seq;
                    books.next_seq += 1;
                    books.services.entry(name.clone()).or_default().push(Entry {
                        pid,
                        start_time,
                        seq,
                        proc: Proc::Child(child),
                    });
                    outcome.started += 1;
                    info!(service = %name, pid, program = %program.display(), "replica started");
                }
                Err(message) => fail(outcome, 1, message),
            }
        }
    }

    /// Spawns one replica and records it. Returns the child, its pid and its start time.
    async fn spawn_one(
        &self,
        service: &Service,
        program: &Path,
        args: &[String],
        log: &fs::File,
    ) -> Result<(tokio::process::Child, u32, u64), String> {
        let name = &service.name;
        let mut attempt = 0;
        let mut child = loop {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args).env_clear().envs(&managed(service).env);
            // A bare program name is looked up on PATH, and the lookup uses the child's PATH:
            // pass the daemon's PATH (a list of directories, no secret) only then, and only
            // when the service does not set its own. An absolute or relative path gets no PATH.
            let bare = !program.as_os_str().as_encoded_bytes().contains(&b'/');
            if bare && !managed(service).env.contains_key("PATH") {
                if let Some(path) = std::env::var_os("PATH") {
                    cmd.env("PATH", path);
                }
            }
            cmd.env("MICROSCALER_SERVICE", name.as_str())
                .env("MICROSCALER_INSTANCE", &self.instance)
                .stdin(Stdio::null())
                .stdout(clone_log(log)?)
                .stderr(clone_log(log)?)
                // Its own process group: a Ctrl-C on the daemon's terminal does not reach it,
                // and a stop signals its whole group.
                .process_group(0)
                // Replicas outlive the daemon unless shut down with removal.
                .kill_on_drop(false);
            if let Some(dir) = &self.work_dir {
                cmd.current_dir(dir);
            }
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TXTBSY_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    let hint = match e.kind() {
                        io::ErrorKind::NotFound if bare => {
                            "check run.command: the program must be on the daemon's PATH or given as a path"
                        }
                        io::ErrorKind::NotFound => {
                            "check run.command (the program must exist) and backend.work_dir"
                        }
                        io::ErrorKind::PermissionDenied => {
                            "check run.command: the program must be executable (chmod +x)"
                        }
                        _ => "check run.command",
                    };
                    let in_dir = match &self.work_dir {
                        Some(d) => format!(" in {}", d.display()),
                        None => String::new(),
                    };
                    return Err(format!(
                        "cannot start a replica of service {name}: program {}{in_dir}: {e}; {hint}",
                        program.display()
                    ));
                }
            }
        };
        // The pid stays ours until the child is reaped, which only happens through `child`.
        let Some(pid) = child.id() else {
            return Err(format!(
                "replica of service {name} exited before it could be recorded"
            ));
        };
        let recorded = match proc_stat(pid) {
            Some(stat) => self
                .write_record(name, pid, stat.start_time)
                .map(|()| stat.start_time)
                .map_err(|e| {
                    format!(
                        "cannot record replica {pid} of service {name} in {}: {e}; make the state directory writable",
                        self.state_dir.display()
                    )
                }),
            None => Err(format!(
                "cannot read /proc/{pid}/stat of the replica of service {name}: is /proc mounted?"
            )),
        };
        match recorded {
            Ok(start_time) => Ok((child, pid, start_time)),
            Err(message) => {
                // An unrecorded replica would be lost on restart: do not leave it running.
                signal_group(pid, Signal::SIGKILL);
                let _ = child.wait().await;
                Err(message)
            }
        }
    }

    fn write_record(&self, service: &ServiceName, pid: u32, start_time: u64) -> io::Result<()> {
        let dir = self.state_dir.join(service.as_str());
        let tmp = dir.join(format!(".{pid}.tmp"));
        let record = Record {
            pid,
            start_time,
            boot_id: self.boot_id.clone(),
            instance: self.instance.clone(),
        };
        fs::write(&tmp, record.render())?;
        fs::rename(&tmp, dir.join(pid.to_string()))
    }
}

/// Stops the `count` newest live replicas of `service`, concurrently. Returns how many stopped.
async fn stop_newest(
    inner: &Arc<Inner>,
    service: &Service,
    count: u32,
) -> Result<u32, BackendError> {
    let picked = {
        let mut books = inner.books();
        let Some(entries) = books.services.get_mut(&service.name) else {
            return Ok(0);
        };
        let mut live: Vec<&mut Entry> = entries
            .iter_mut()
            .filter(|e| !matches!(e.proc, Proc::Stopping))
            .collect();
        live.sort_by_key(|e| std::cmp::Reverse(e.seq));
        live.into_iter()
            .take(count as usize)
            .map(take_for_stop)
            .collect::<Vec<_>>()
    };
    run_stops(inner, &service.name, picked, service.stop_grace).await
}

/// Stops every live replica of `service` (shutdown with removal).
async fn stop_all_of(
    inner: &Arc<Inner>,
    service: &ServiceName,
    grace: Duration,
) -> Result<u32, BackendError> {
    let picked = {
        let mut books = inner.books();
        let Some(entries) = books.services.get_mut(service) else {
            return Ok(0);
        };
        entries
            .iter_mut()
            .filter(|e| !matches!(e.proc, Proc::Stopping))
            .map(take_for_stop)
            .collect::<Vec<_>>()
    };
    run_stops(inner, service, picked, grace).await
}

/// Marks `entry` as stopping and hands its process to the caller.
fn take_for_stop(entry: &mut Entry) -> (u32, u64, Handle) {
    let handle = match std::mem::replace(&mut entry.proc, Proc::Stopping) {
        Proc::Child(child) => Handle::Child(child),
        Proc::Adopted | Proc::Stopping => Handle::Adopted,
    };
    (entry.pid, entry.start_time, handle)
}

/// Runs one task per replica (so a stop finishes even if the caller is cancelled), waits for
/// all, and settles the books: a stopped replica leaves the books and its record is deleted; one
/// that could not be stopped goes back to the books as live.
async fn run_stops(
    inner: &Arc<Inner>,
    service: &ServiceName,
    picked: Vec<(u32, u64, Handle)>,
    grace: Duration,
) -> Result<u32, BackendError> {
    if picked.is_empty() {
        return Ok(0);
    }
    let tasks = picked.into_iter().map(|(pid, start_time, handle)| {
        let inner = Arc::clone(inner);
        let service = service.clone();
        tokio::spawn(async move {
            let result = stop_one(&service, pid, start_time, handle, grace).await;
            let mut books = inner.books();
            let entries = books.services.entry(service.clone()).or_default();
            match result {
                Ok(()) => {
                    entries.retain(|e| e.pid != pid);
                    let _ = fs::remove_file(inner.record_path(&service, pid));
                    books.services.retain(|_, es| !es.is_empty());
                    Ok(())
                }
                Err((handle, message)) => {
                    if let Some(e) = entries.iter_mut().find(|e| e.pid == pid) {
                        e.proc = match handle {
                            Handle::Child(child) => Proc::Child(child),
                            Handle::Adopted => Proc::Adopted,
                        };
                    }
                    Err(message)
                }
            }
        })
    });
    let mut stopped = 0;
    let mut errors = Vec::new();
    for result in futures::future::join_all(tasks).await {
        match result {
            Ok(Ok(())) => stopped += 1,
            Ok(Err(message)) => errors.push(message),
            Err(join) => errors.push(format!("a stop task of service {service} failed: {join}")),
        }
    }
    if errors.is_empty() {
        Ok(stopped)
    } else {
        Err(BackendError::Api {
            op: format!("stop replicas of service {service}"),
            message: errors.join("; "),
        })
    }
}

/// SIGTERM, up to `grace` for the replica to exit, then SIGKILL; our children are reaped here.
async fn stop_one(
    service: &ServiceName,
    pid: u32,
    start_time: u64,
    handle: Handle,
    grace: Duration,
) -> Result<(), (Handle, String)> {
    let began = Instant::now();
    match handle {
        Handle::Child(mut child) => {
            // `child.id()` is `None` once reaped: only then could the pid be reused.
            if child.id().is_some() {
                signal_group(pid, Signal::SIGTERM);
            }
            let status = match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    warn!(service = %service, pid, grace = ?grace,
                        "replica did not stop within its stop grace; killing it");
                    if child.id().is_some() {
                        signal_group(pid, Signal::SIGKILL);
                    }
                    match tokio::time::timeout(KILL_WAIT, child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            let msg = format!(
                                "replica {pid} of service {service} is still there {KILL_WAIT:?} after SIGKILL \
                                 (stuck in uninterruptible I/O?); it will be retried"
                            );
                            return Err((Handle::Child(child), msg));
                        }
                    }
                }
            };
            match status {
                Ok(status) => {
                    log_stopped(service, pid, began, Some(status));
                    Ok(())
                }
                Err(e) => {
                    let msg = format!("cannot wait for replica {pid} of service {service}: {e}");
                    Err((Handle::Child(child), msg))
                }
            }
        }
        Handle::Adopted => {
            signal_adopted(pid, start_time, Signal::SIGTERM);
            if wait_gone(pid, start_time, grace).await {
                log_stopped(service, pid, began, None);
                return Ok(());
            }
            warn!(service = %service, pid, grace = ?grace,
                "adopted replica did not stop within its stop grace; killing it");
            signal_adopted(pid, start_time, Signal::SIGKILL);
            if wait_gone(pid, start_time, KILL_WAIT).await {
                log_stopped(service, pid, began, None);
                Ok(())
            } else {
                let msg = format!(
                    "adopted replica {pid} of service {service} is still there {KILL_WAIT:?} after SIGKILL \
                     (stuck in uninterruptible I/O?); it will be retried"
                );
                Err((Handle::Adopted, msg))
            }
        }
    }
}

fn log_stopped(service: &ServiceName, pid: u32, began: Instant, status: Option<ExitStatus>) {
    let status = status.map_or_else(|| "unknown (adopted)".to_string(), |s| s.to_string());
    info!(service = %service, pid, took = ?began.elapsed(), status = %status, "replica stopped");
}

/// Signals the process group our child leads (it was started with `process_group(0)`); if it
/// left that group, only the child itself.
fn signal_group(pid: u32, signal: Signal) {
    let target = Pid::from_raw(pid as i32);
    match killpg(target, signal) {
        Ok(()) => {}
        Err(Errno::ESRCH) => {
            let _ = kill(target, signal);
        }
        Err(e) => warn!(pid, signal = %signal, error = %e, "cannot signal a replica"),
    }
}

/// Signals an adopted replica, after checking it is still the recorded process. Not our child,
/// so it cannot be pinned: the check and the signal are a few microseconds apart, and a pid is
/// only reused after a full cycle of the pid space.
fn signal_adopted(pid: u32, start_time: u64, signal: Signal) {
    let Some(stat) = proc_stat(pid) else { return };
    if stat.start_time != start_time || stat.state == 'Z' {
        return;
    }
    if stat.pgrp == pid as i32 {
        signal_group(pid, signal);
    } else {
        let _ = kill(Pid::from_raw(pid as i32), signal);
    }
}

/// Polls `/proc` until the recorded process is gone (or a zombie, which init reaps).
async fn wait_gone(pid: u32, start_time: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !is_alive(pid, start_time) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn clone_log(log: &fs::File) -> Result<Stdio, String> {
    log.try_clone()
        .map(Stdio::from)
        .map_err(|e| format!("cannot share the replica log file: {e}"))
}

/// The fields of `/proc/{pid}/stat` the backend uses.
struct ProcStat {
    state: char,
    pgrp: i32,
    start_time: u64,
}

/// How the temporary copies of the built-in replica begin: `{REPLICA_TMP}{pid}-{n}`.
const REPLICA_TMP: &str = ".replica.tmp-";

/// True for a `{REPLICA_TMP}{pid}-{n}` (see `ensure_replica`) whose writer is no longer
/// running: what a crash while writing the built-in replica leaves. A running writer's file
/// (another daemon sharing the directory, mid-write) is left alone.
fn stale_replica_tmp(file: &str) -> bool {
    let Some((pid, n)) = file
        .strip_prefix(REPLICA_TMP)
        .and_then(|rest| rest.split_once('-'))
    else {
        return false;
    };
    match (pid.parse::<u32>(), n.parse::<u64>()) {
        (Ok(pid), Ok(_)) => pid != std::process::id() && proc_stat(pid).is_none(),
        _ => false,
    }
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/{pid}/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// True while `pid` is the process that started at `start_time` and has not exited.
fn is_alive(pid: u32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_time == start_time && s.state != 'Z' && s.state != 'X')
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn mem_total() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One replica record: `key value` lines, so it stays readable with `cat`.
#[derive(Debug, PartialEq)]
struct Record {
    pid: u32,
    start_time: u64,
    boot_id: String,
    instance: String,
}

impl Record {
    fn render(&self) -> String {
        format!(
            "pid {}\nstart_time {}\nboot_id {}\ninstance {}\n",
            self.pid, self.start_time, self.boot_id, self.instance
        )
    }

    fn parse(text: &str) -> Option<Record> {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(' ') {
                fields.insert(k, v.trim());
            }
        }
        Some(Record {
            pid: fields.get("pid")?.parse().ok()?,
            start_time: fields.get("start_time")?.parse().ok()?,
            boot_id: fields.get("boot_id").unwrap_or(&"").to_string(),
            instance: fields.get("instance")?.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let mut fields = vec!["0"; 50];
        fields[0] = "S";
        fields[2] = "4242";
        fields[19] = "987654";
        let text = format!("4242 (we ird) (name) {}\n", fields.join(" "));
        let stat = parse_stat(&text).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgrp, 4242);
        assert_eq!(stat.start_time, 987654);
    }

    #[test]
    fn own_stat_is_readable_and_alive() {
        let pid = std::process::id();
        let stat = proc_stat(pid).expect("our own /proc/self/stat");
        assert!(is_alive(pid, stat.start_time));
        assert!(
            !is_alive(pid, stat.start_time + 1),
            "a different start time is another process"
        );
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            pid: 12,
            start_time: 34,
            boot_id: "b".into(),
            instance: "demo".into(),
        };
        assert_eq!(Record::parse(&r.render()), Some(r));
        assert_eq!(Record::parse("pid x\n"), None);
    }
}
