//! The history: every tick's chart values and every decision, in an embedded SQLite database,
//! so the charts and the decision feed survive a restart of the daemon.
//!
//! One writer thread owns the writing connection (the control loop never waits on the disk);
//! readers use their own connection. WAL mode lets them read while it writes. Rows older than
//! the retention are deleted about once a minute.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use crate::model::{Decision, HistoryPoint, Tick};

/// Errors of the history store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or queried.
    #[error("history database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database's directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What the writer thread is sent.
enum Msg {
    /// A tick to write.
    Tick(Box<Tick>),
    /// Answer once everything sent before is written.
    Flush(mpsc::Sender<()>),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS points (
    ts INTEGER NOT NULL,
    point TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS points_ts ON points (ts);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    service TEXT NOT NULL,
    kind TEXT NOT NULL,
    count INTEGER NOT NULL,
    from_target INTEGER NOT NULL,
    to_target INTEGER NOT NULL,
    bound TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts);
";

/// The history store.
pub struct Store {
    path: PathBuf,
    reader: Mutex<Connection>,
    writer: Mutex<Option<mpsc::Sender<Msg>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn open(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    let c = Connection::open_with_flags(path, flags).map_err(err)?;
    c.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    c.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
    c.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    Ok(c)
}

/// Makes the database readable by its owner only (0600), as a new file and as one an older
/// version created world-readable; SQLite gives its `-wal` and `-shm` files the database's mode.
/// The history holds the services' names, demand and decisions, which the API shows only to
/// loopback clients or with the token.
fn private(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                for p in [
                    path.to_path_buf(),
                    sidecar(path, "-wal"),
                    sidecar(path, "-shm"),
                ] {
                    let Ok(meta) = std::fs::metadata(&p) else {
                        continue;
                    };
                    if meta.permissions().mode() & 0o077 != 0 {
                        if let Err(e) =
                            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                        {
                            tracing::warn!(
                                "history {}: readable by others and cannot be made private: {e}",
                                p.display()
                            );
                        }
                    }
                }
            }
            Err(source) => {
                return Err(StoreError::Dir {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl Store {
    /// Opens (or creates) the database at `path`, keeping `retention` of history.
    pub fn open(path: &Path, retention: Duration) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        private(path)?;
        let w = open(path, OpenFlags::default())?;
        w.execute_batch(SCHEMA)
            .map_err(|source| StoreError::Sqlite {
                path: path.display().to_string(),
                source,
            })?;
        let reader = open(path, OpenFlags::default())?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let display = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("history-writer".into())
            .spawn(move || writer(w, rx, retention, display))
            .map_err(|source| StoreError::Dir {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Store {
            path: path.to_path_buf(),
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `tick` for writing; never blocks on the disk.
    pub fn record(&self, tick: &Tick) {
        if let Some(tx) = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(Msg::Tick(Box::new(tick.clone())));
        }
    }

    /// Waits until every tick recorded before is written.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        let sent = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|w| w.send(Msg::Flush(tx)).is_ok());
        if sent {
            let _ = rx.recv();
        }
    }

    /// Writes everything queued, then stops the writer. Later records are dropped.
    pub fn close(&self) {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// History points with `from <= ts <= to`, oldest first, thinned evenly to at most
    /// `limit` points.
    pub fn history(
        &self,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<HistoryPoint>, StoreError> {
        let c = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let err = |source| StoreError::Sqlite {
            path: self.path.display().to_string(),
            source,
        };
        let count: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM points WHERE ts BETWEEN ?1 AND ?2",
                params![from, to],
                |r| r.get(0),
            )
            .map_err(err)?;
        let every = ((count as usize).div_ceil(limit.max(1))).max(1) as i64;
        let mut stmt = c
            .prepare_cached(
                "SELECT point FROM (SELECT point, ts, ROW_NUMBER() OVER (ORDER BY ts) - 1 AS n
                 FROM points WHERE ts BETWEEN ?1 AND ?2) WHERE n % ?3 = 0 ORDER BY ts",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![from, to, every], |r| r.get::<_, String>(0))
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(p) = serde_json::from_str(&row.map_err(err)?) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The latest `limit` decisions with `from <= ts <= to`, newest first, optionally of one
    /// service.
    pub fn decisions(
        &self,
        from: i64,
        to: i64,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Decision>, StoreError> {
        let c = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let err = |source| StoreError::Sqlite {
            path: self.path.display().to_string(),
            source,
        };
        let mut stmt = c
            .prepare_cached(
                "SELECT ts, kind, service, count, from_target, to_target, bound, reason
                 FROM decisions WHERE ts BETWEEN ?1 AND ?2 AND (?3 IS NULL OR service = ?3)
                 ORDER BY ts DESC, id DESC LIMIT ?4",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![from, to, service, limit as i64], |r| {
                Ok(Decision {
                    ts: r.get(0)?,
                    kind: r.get(1)?,
                    service: r.get(2)?,
                    count: r.get(3)?,
                    from: r.get(4)?,
                    to: r.get(5)?,
                    bound: r.get(6)?,
                    reason: r.get(7)?,
                })
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer(mut c: Connection, rx: mpsc::Receiver<Msg>, retention: Duration, path: String) {
    let mut last_prune: Option<i64> = None;
    while let Ok(first) = rx.recv() {
        // Write everything that is queued in one transaction.
        let mut batch = Vec::new();
        let mut waiting = Vec::new();
        for m in std::iter::once(first).chain(rx.try_iter()) {
            match m {
                Msg::Tick(t) => batch.push(*t),
                Msg::Flush(w) => waiting.push(w),
            }
        }
        if batch.is_empty() {
            for w in waiting {
                let _ = w.send(());
            }
            continue;
        }
        let newest = batch.iter().map(|t| t.ts).max().unwrap_or(0);
        if let Err(e) = write_batch(&mut c, &batch) {
            tracing::warn!(path = %path, error = %e, "cannot write history");
        }
        if last_prune.is_none_or(|l| newest - l >= 60_000) {
            last_prune = Some(newest);
            let cutoff = newest - retention.as_millis() as i64;
            let pruned = c
                .execute("DELETE FROM points WHERE ts < ?1", [cutoff])
                .and_then(|_| c.execute("DELETE FROM decisions WHERE ts < ?1", [cutoff]));
            if let Err(e) = pruned {
                tracing::warn!(path = %path, error = %e, "cannot prune history");
            }
        }
        for w in waiting {
            let _ = w.send(());
        }
    }
}

fn write_batch(c: &mut Connection, batch: &[Tick]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    {
        let mut p = tx.prepare_cached("INSERT INTO points (ts, point) VALUES (?1, ?2)")?;
        let mut d = tx.prepare_cached(
            "INSERT INTO decisions (ts, service, kind, count, from_target, to_target, bound, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for t in batch {
            if t.capacity > 0 {
                let json = serde_json::to_string(&HistoryPoint::of(t)).unwrap_or_default();
                p.execute(params![t.ts, json])?;
            }
            for a in &t.decisions {
                d.execute(params![
                    a.ts, a.service, a.kind, a.count, a.from, a.to, a.bound, a.reason
                ])?;
            }
        }
    }
    tx.commit()
}
