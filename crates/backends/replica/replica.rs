//! The built-in replica: the program inside microscaler's own image (and the demo's replicas).
//!
//! It does no work; it stands for one unit of a service. What matters is that it stops at once
//! and cleanly on SIGTERM or SIGINT, even as PID 1 in a container (where the kernel gives no
//! default signal handling): the seeds' replicas ignored SIGTERM and were force-killed after a
//! 30 s timeout. It is compiled by `build.rs` with plain `rustc` as a fully static binary with
//! no dependencies, so it runs in an image that holds nothing else.

use std::io::Write;

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

fn main() {
    let service = std::env::var("MICROSCALER_SERVICE").unwrap_or_default();
    let mut sig = 0;
    // SAFETY: plain libc calls on a zero-initialised, correctly sized sigset_t.
    unsafe {
        let mut set = SigSet([0; 16]);
        sigemptyset(&mut set);
        sigaddset(&mut set, SIGTERM);
        sigaddset(&mut set, SIGINT);
        pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut());
        let _ = writeln!(std::io::stdout(), "replica of {service:?} running");
        sigwait(&set, &mut sig);
    }
    let _ = writeln!(std::io::stdout(), "replica of {service:?}: signal {sig}, exiting");
    std::process::exit(0);
}
