//! The connections: accepted here and served by hyper's HTTP/1 with a header-read timeout, so
//! a client that sends its head slowly (slowloris), or keeps an idle connection open, is cut
//! off after the read timeout.
//!
//! hyper answers a request it cannot parse on its own (400, 414 URI too long, 431 headers too
//! large), without a body and without passing through the router's layers. [`OwnErrors`]
//! replaces such an answer, as it is written, with the API's JSON error and security headers:
//! every answer the router makes carries `x-content-type-options`, so one without it is hyper's.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower_service::Service;

use crate::api;

/// Accepts connections on `listener` and serves `app` on them until `shutdown` resolves, then
/// lets every connection finish its request in flight and waits for them.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let app = app.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().call(req)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout);
            let io = TokioIo::new(OwnErrors::new(stream));
            let mut conn = pin!(builder.serve_connection(io, service));
            let stopping = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            let ended = match tokio::select! {
                ended = conn.as_mut() => Some(ended),
                _ = stopping => None,
            } {
                Some(ended) => ended,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    let _ = stop_tx.send(true);
    drop(stop_rx);
    // Every connection holds a receiver until it ends.
    stop_tx.closed().await;
    Ok(())
}

/// An error accepting a connection: those of one connection are skipped, others (too many
/// open files) are waited out a moment rather than spun on.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!("cannot accept a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A connection whose writes are watched for hyper's own error answers (see the module).
/// Not vectored, so hyper writes each answer's head from one buffer.
struct OwnErrors<T> {
    io: T,
    /// The replacement answer still to write, and how much of it is written.
    pending: Vec<u8>,
    sent: usize,
}

impl<T> OwnErrors<T> {
    fn new(io: T) -> Self {
        OwnErrors {
            io,
            pending: Vec::new(),
            sent: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> OwnErrors<T> {
    /// Writes what is left of a replacement answer.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for OwnErrors<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for OwnErrors<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        if let Some(answer) = replacement(buf) {
            this.pending = answer;
            // hyper's answer counts as written; ours goes out now or with the next flush.
            if let Poll::Ready(Err(e)) = this.drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The API's answer for `buf` when `buf` starts with an error answer of hyper's own.
fn replacement(buf: &[u8]) -> Option<Vec<u8>> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    let message = match rest.get(..4)? {
        b"400 " => "malformed request: the request line and headers must be valid HTTP/1.1, with a path of ASCII characters (percent-encode the others)",
        b"414 " => "the request's URI is too long",
        b"431 " => "the request's headers are too large or too many",
        _ => return None,
    };
    // Heads are short: look no further than 8 KiB for its end.
    let window = &buf[..buf.len().min(8192)];
    let end = window.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = window[..end].to_ascii_lowercase();
    if head
        .windows(b"\r\nx-content-type-options:".len())
        .any(|w| w == b"\r\nx-content-type-options:")
    {
        return None;
    }
    let status = axum::http::StatusCode::from_bytes(&rest[..3]).ok()?;
    Some(api::raw_error(status, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_error_heads_are_replaced() {
        let hyper =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let ours = replacement(hyper).expect("replaced");
        let text = String::from_utf8(ours).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nx-content-type-options: nosniff\r\n"),
            "{text}"
        );
        assert!(text.ends_with(r#"{"error":"the request's headers are too large or too many"}"#));
        let routed = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-content-type-options: nosniff\r\ncontent-length: 2\r\n\r\n{}";
        assert!(replacement(routed).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(replacement(b"event: tick\ndata: HTTP/1.1 400 \r\n\r\n").is_none());
    }
}
