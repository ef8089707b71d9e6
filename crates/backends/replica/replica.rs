//! The built-in replica: the program inside microscaler's own image (and the demo's replicas).
//!
//! By default it does no work; it stands for one unit of a service. What matters is that it
//! stops at once and cleanly on SIGTERM or SIGINT, even as PID 1 in a container (where the
//! kernel gives no default signal handling): the seeds' replicas ignored SIGTERM and were
//! force-killed after a 30 s timeout. It is compiled by `build.rs` with plain `rustc` as a fully
//! static binary with no dependencies, so it runs in an image that holds nothing else.
//!
//! Worker mode (the queue demo): with `MICROSCALER_WORK_REDIS=host:port` in its environment a
//! thread takes jobs from a Redis list (`MICROSCALER_WORK_QUEUE`, default `jobs`) with
//! `BLPOP key 1` over plain RESP and "works" on each by sleeping `MICROSCALER_WORK_MS`
//! (default 250) milliseconds; if Redis goes away it reconnects with a short backoff. The main
//! thread still only waits for the signal: the mask is set before the thread starts, so the
//! thread inherits it and the signal can only reach `sigwait`, and the exit is as prompt as
//! ever (a job in progress is abandoned, as any interruptible worker's would be).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[repr(C)]
struct SigSet([u64; 16]);

extern "C" {
    fn sigemptyset(set: *mut SigSet) -> i32;
    fn sigaddset(set: *mut SigSet, sig: i32) -> i32;
    fn pthread_sigmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
    fn sigwait(set: *const SigSet, sig: *mut i32) -> i32;
}

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const SIG_BLOCK: i32 = 0;

/// Jobs finished by the worker thread, reported at exit.
static DONE: AtomicU64 = AtomicU64::new(0);

fn main() {
    let service = std::env::var("MICROSCALER_SERVICE").unwrap_or_default();
    let mut sig = 0;
    // SAFETY: plain libc calls on a zero-initialised, correctly sized sigset_t.
    let mut set = SigSet([0; 16]);
    unsafe {
        sigemptyset(&mut set);
        sigaddset(&mut set, SIGTERM);
        sigaddset(&mut set, SIGINT);
        pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // Started after the mask is set: the worker thread inherits it.
    let worker = Worker::from_env();
    match &worker {
        Some(w) => {
            let _ = writeln!(
                std::io::stdout(),
                "replica of {service:?} running: worker of Redis list {:?} at {}, {} ms per job",
                w.queue,
                w.addr,
                w.job.as_millis()
            );
            let w = w.clone();
            std::thread::spawn(move || w.run());
        }
        None => {
            let _ = writeln!(std::io::stdout(), "replica of {service:?} running");
        }
    }
    // SAFETY: `set` is the initialised sigset_t above.
    unsafe {
        sigwait(&set, &mut sig);
    }
    if worker.is_some() {
        let _ = writeln!(
            std::io::stdout(),
            "replica of {service:?}: signal {sig}, exiting after {} jobs",
            DONE.load(Ordering::Relaxed)
        );
    } else {
        let _ = writeln!(
            std::io::stdout(),
            "replica of {service:?}: signal {sig}, exiting"
        );
    }
    std::process::exit(0);
}

/// The worker mode's settings, from the environment.
#[derive(Clone)]
struct Worker {
    /// `host:port` of Redis.
    addr: String,
    /// The list's key.
    queue: String,
    /// Time spent on one job.
    job: Duration,
}

impl Worker {
    fn from_env() -> Option<Worker> {
        let raw = std::env::var("MICROSCALER_WORK_REDIS").ok()?;
        let raw = raw.trim();
        if raw.is_empty() {
            return None;
        }
        // Accept `redis://host:port[/db]` too; only host and port are used.
        let addr = raw.strip_prefix("redis://").unwrap_or(raw);
        let addr = addr.split('/').next().unwrap_or(addr);
        let addr = if addr.contains(':') {
            addr.to_string()
        } else {
            format!("{addr}:6379")
        };
        let queue = std::env::var("MICROSCALER_WORK_QUEUE")
            .ok()
            .filter(|q| !q.is_empty())
            .unwrap_or_else(|| "jobs".into());
        let ms = std::env::var("MICROSCALER_WORK_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(250);
        Some(Worker {
            addr,
            queue,
            job: Duration::from_millis(ms),
        })
    }

    /// Takes and works jobs for ever; reconnects with a backoff of 100 ms doubling to 2 s.
    fn run(self) {
        let mut backoff = Duration::from_millis(100);
        let mut failing = false;
        loop {
            let mut connected = false;
            let err = self.session(&mut connected);
            if connected {
                backoff = Duration::from_millis(100);
            }
            if !failing || connected {
                let _ = writeln!(
                    std::io::stderr(),
                    "replica worker: Redis at {}: {err}; retrying",
                    self.addr
                );
            }
            failing = true;
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One connection: BLPOP until something fails. `connected` tells whether Redis answered.
    fn session(&self, connected: &mut bool) -> std::io::Error {
        match self.session_inner(connected) {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn session_inner(&self, connected: &mut bool) -> std::io::Result<std::convert::Infallible> {
        let sa = self
            .addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| other(format!("{} resolves to no address", self.addr)))?;
        let mut stream = TcpStream::connect_timeout(&sa, Duration::from_secs(1))?;
        stream.set_nodelay(true)?;
        // BLPOP answers within its 1 s timeout; a silent server is a dead one.
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let cmd = format!(
            "*3\r\n$5\r\nBLPOP\r\n${}\r\n{}\r\n$1\r\n1\r\n",
            self.queue.len(),
            self.queue
        );
        loop {
            stream.write_all(cmd.as_bytes())?;
            let reply = read_value(&mut reader, 0)?;
            // A server that answers resets the backoff; one that hangs up at once does not.
            *connected = true;
            match reply {
                Resp::Nil => {}
                Resp::Array(items) if items.len() == 2 => {
                    std::thread::sleep(self.job);
                    DONE.fetch_add(1, Ordering::Relaxed);
                }
                Resp::Error(e) => return Err(other(format!("BLPOP: {e}"))),
                _ => return Err(other("BLPOP: unexpected reply".into())),
            }
        }
    }
}

fn other(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Other, msg)
}

/// A RESP2 (or RESP3 null) value, as much as BLPOP needs.
enum Resp {
    Nil,
    Simple,
    Bulk,
    Array(Vec<Resp>),
    Error(String),
}

/// Largest bulk string accepted (a job's payload); larger replies end the connection.
const MAX_BULK: usize = 64 << 20;

fn read_value(r: &mut impl BufRead, depth: u32) -> std::io::Result<Resp> {
    if depth > 4 {
        return Err(other("reply nested too deep".into()));
    }
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(other("connection closed".into()));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    let len = || -> std::io::Result<i64> {
        rest.parse()
            .map_err(|_| other(format!("bad length in reply {line:?}")))
    };
    match kind {
        "+" | ":" => Ok(Resp::Simple),
        "-" => Ok(Resp::Error(rest.to_string())),
        "_" => Ok(Resp::Nil),
        "$" => {
            let n = len()?;
            if n < 0 {
                return Ok(Resp::Nil);
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(other(format!("bulk reply of {n} bytes is too large")));
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf)?;
            Ok(Resp::Bulk)
        }
        "*" => {
            let n = len()?;
            if n < 0 {
                return Ok(Resp::Nil);
            }
            if n > 1024 {
                return Err(other(format!("array reply of {n} items is too large")));
            }
            (0..n)
                .map(|_| read_value(r, depth + 1))
                .collect::<std::io::Result<Vec<_>>>()
                .map(Resp::Array)
        }
        _ => Err(other(format!("unexpected reply {line:?}"))),
    }
}
