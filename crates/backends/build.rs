//! Builds the built-in replica (`replica/replica.rs`) as a fully static binary with plain
//! `rustc`, so the crate can embed it and import it as a one-file image into any Docker engine:
//! no registry is needed and nothing else has to be installed.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=replica/replica.rs");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("replica");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = env::var("TARGET").expect("TARGET");
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            "--crate-name=replica",
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
            "-C",
            "target-feature=+crt-static",
            "--target",
            &target,
            "-o",
        ])
        .arg(&out)
        .arg("replica/replica.rs")
        .status()
        .expect("run rustc for the built-in replica");
    assert!(
        status.success(),
        "building the static replica failed: it needs the C library's static archive (libc6-dev)"
    );
}
