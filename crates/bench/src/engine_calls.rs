//! A counting front for the Docker engine's socket: the daemon under measurement talks to the
//! engine through it (`[backend] host = "tcp://127.0.0.1:PORT"`), and it counts the requests
//! that list containers (`GET .../containers/json`), as seen on the wire. Plain threads: it
//! copies bytes both ways and scans only what the client sends.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// The proxy; its threads end with the process (the bench is short-lived).
pub struct EngineCalls {
    address: String,
    listings: Arc<AtomicU64>,
}

impl EngineCalls {
    /// Listens on a free port of 127.0.0.1, forwarding to the Unix socket at `socket`.
    pub fn start(socket: &str) -> Result<EngineCalls> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the counting proxy")?;
        let address = format!("tcp://{}", listener.local_addr()?);
        let listings = Arc::new(AtomicU64::new(0));
        let socket = socket.to_string();
        let count = Arc::clone(&listings);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(engine) = UnixStream::connect(&socket) else {
                    continue;
                };
                let count = Arc::clone(&count);
                let (Ok(client_r), Ok(engine_w)) = (client.try_clone(), engine.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || upstream(client_r, engine_w, &count));
                std::thread::spawn(move || downstream(engine, client));
            }
        });
        Ok(EngineCalls { address, listings })
    }

    /// Where to point the daemon.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Container listings forwarded so far.
    pub fn listings(&self) -> u64 {
        self.listings.load(Ordering::Relaxed)
    }
}

/// Client to engine, counting listings. A request line can straddle two reads: the tail of
/// the previous read is scanned again with the next.
fn upstream(mut client: TcpStream, mut engine: UnixStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if engine.write_all(&buf[..n]).is_err() {
            break;
        }
        carry.extend_from_slice(&buf[..n]);
        let (found, keep) = listings_in(&carry);
        count.fetch_add(found, Ordering::Relaxed);
        carry.drain(..keep);
    }
    let _ = engine.shutdown(Shutdown::Write);
}

fn downstream(mut engine: UnixStream, mut client: TcpStream) {
    let _ = std::io::copy(&mut engine, &mut client);
    let _ = client.shutdown(Shutdown::Write);
}

/// Container listings whose request line is complete in `bytes`, and how many bytes of it are
/// scanned for good (the rest may hold the start of a request line).
fn listings_in(bytes: &[u8]) -> (u64, usize) {
    let mut found = 0;
    let mut done = 0;
    let mut i = 0;
    while let Some(at) = find(&bytes[i..], b"GET /") {
        let start = i + at;
        let Some(end) = find(&bytes[start..], b"\r\n") else {
            return (found, start);
        };
        let line = &bytes[start..start + end];
        let path = line
            .split(|b| *b == b'?' || *b == b' ')
            .nth(1)
            .unwrap_or_default();
        if path.ends_with(b"/containers/json") {
            found += 1;
        }
        i = start + end;
        done = i;
    }
    // No request line starts in what is left but maybe in its last 4 bytes ("GET").
    (found, done.max(bytes.len().saturating_sub(4)))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::listings_in;

    #[test]
    fn counts_listing_request_lines_also_across_reads() {
        let two = b"GET /v1.41/containers/json?all=1&filters=x HTTP/1.1\r\nHost: d\r\n\r\nGET /v1.41/info HTTP/1.1\r\n\r\nGET /containers/json HTTP/1.1\r\n";
        assert_eq!(listings_in(two).0, 2);
        let (n, keep) = listings_in(b"xx\r\n\r\nGET /v1.41/contai");
        assert_eq!(n, 0);
        assert_eq!(keep, 6, "the partial request line is kept");
        assert_eq!(
            listings_in(b"GET /v1.41/containers/abc/json HTTP/1.1\r\n").0,
            0
        );
    }
}
