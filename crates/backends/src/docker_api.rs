//! What the Docker and Swarm backends share: connecting to an engine with a clear error when it
//! does not answer, and the built-in replica image, imported from a binary embedded in this
//! crate (no registry is reachable, and none is needed).

use std::time::Duration;

use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;

use crate::BackendError;

/// The built-in replica, a static binary built by `build.rs` from `replica/replica.rs`.
pub static REPLICA_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/replica"));

/// Repository of the built-in replica image.
pub const REPLICA_REPO: &str = "microscaler-replica";

/// The default engine address when neither the config nor `DOCKER_HOST` names one.
pub const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";

/// The built-in image's reference; the tag is a hash of the binary, so a changed replica gets a
/// new image and an unchanged one is imported only once per engine.
pub fn replica_image() -> String {
    // FNV-1a: stable across runs and Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in REPLICA_BINARY {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{REPLICA_REPO}:{h:016x}")
}

/// The address that will be used: the config's, else `DOCKER_HOST`, else the default socket.
pub fn engine_address(configured: Option<&str>) -> String {
    configured
        .map(str::to_string)
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DEFAULT_SOCKET.to_string())
}

fn unreachable(addr: &str, e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    BackendError::Unreachable {
        what: format!("the Docker engine at {addr}"),
        hint: format!(
            "{e}; is dockerd running and may this user open its socket? \
             Set DOCKER_HOST or [backend] host to point at another engine"
        ),
        source: Some(Box::new(e)),
    }
}

/// Connects to the engine at `configured` (or `DOCKER_HOST`, or the default socket), checks
/// that it answers, and negotiates the API version (Debian's engine refuses newer clients).
pub async fn connect(configured: Option<&str>) -> Result<Docker, BackendError> {
    let addr = engine_address(configured);
    let timeout = 120;
    let docker = if let Some(path) = addr.strip_prefix("unix://") {
        Docker::connect_with_unix(path, timeout, bollard::API_DEFAULT_VERSION)
    } else if addr.starts_with("tcp://") || addr.starts_with("http://") {
        Docker::connect_with_http(&addr, timeout, bollard::API_DEFAULT_VERSION)
    } else if addr.starts_with('/') {
        Docker::connect_with_unix(&addr, timeout, bollard::API_DEFAULT_VERSION)
    } else {
        return Err(BackendError::Unreachable {
            what: format!("the Docker engine at {addr:?}"),
            hint: "the address must start with unix://, tcp:// or http://".into(),
            source: None,
        });
    }
    .map_err(|e| unreachable(&addr, e))?;
    // A dead socket fails fast; a hung engine must not hang start-up for two minutes.
    let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
        .await
        .map_err(|_| BackendError::Unreachable {
            what: format!("the Docker engine at {addr}"),
            hint: "no answer within 10 s; is dockerd healthy?".into(),
            source: None,
        })?
        .map_err(|e| unreachable(&addr, e))?;
    docker.ping().await.map_err(|e| unreachable(&addr, e))?;
    Ok(docker)
}

/// Makes sure the built-in replica image exists on the engine, importing it if needed, and
/// returns its reference.
pub async fn ensure_replica_image(docker: &Docker) -> Result<String, BackendError> {
    // Two concurrent imports of the same tag both succeed and leave the loser as a dangling
    // `<none>` image (parallel tests, or two backends in one process): one import at a time.
    static IMPORT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = IMPORT.lock().await;
    let image = replica_image();
    if docker.inspect_image(&image).await.is_ok() {
        return Ok(image);
    }
    let tar = replica_rootfs_tar().map_err(|e| BackendError::Api {
        op: "build the replica image".into(),
        message: e.to_string(),
    })?;
    let (repo, tag) = image.split_once(':').expect("image has a tag");
    let opts = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .changes(vec![r#"CMD ["/replica"]"#.to_string()])
        .build();
    let mut stream = docker.create_image(Some(opts), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            return Err(BackendError::Api {
                op: format!("import image {image}"),
                message: e.to_string(),
            });
        }
    }
    docker
        .inspect_image(&image)
        .await
        .map_err(|e| BackendError::Api {
            op: format!("inspect imported image {image}"),
            message: e.to_string(),
        })?;
    Ok(image)
}

/// A root filesystem holding only `/replica`, as a tar archive.
fn replica_rootfs_tar() -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(REPLICA_BINARY.len() as u64);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, "replica", REPLICA_BINARY)?;
    builder.into_inner()
}

/// A Docker Engine's error answer as a typed error, by its HTTP status: 404 is
/// [`BackendError::NotFound`], 409 [`BackendError::Conflict`], 400 [`BackendError::Invalid`],
/// 429 [`BackendError::Throttled`], the rest [`BackendError::Api`]. Swarm's "update out of
/// sequence" (a 500 carrying no other code) is a conflict too: the service changed since it
/// was read. `None` when the engine did not answer (the caller says it is unreachable).
pub(crate) fn answered(op: String, e: &bollard::errors::Error) -> Option<BackendError> {
    let bollard::errors::Error::DockerResponseServerError {
        status_code,
        message,
    } = e
    else {
        return None;
    };
    let message = format!("{} (HTTP {status_code})", message.trim());
    Some(match status_code {
        404 => BackendError::NotFound {
            what: op,
            hint: message,
        },
        409 => BackendError::Conflict { op, message },
        400 => BackendError::Invalid { op, message },
        429 => BackendError::Throttled { op, message },
        _ if message.contains("update out of sequence") => BackendError::Conflict { op, message },
        _ => BackendError::Api { op, message },
    })
}
