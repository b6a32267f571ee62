//! Builds the test guest (../guest) and hands its path to the crate, which embeds it as the
//! default guest image. The guest is its own Cargo workspace with its own target settings
//! (freestanding link, panic = abort), so it is built by a separate cargo run with a clean
//! environment: nothing of this build's flags, wrappers (clippy) or target leaks into it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir.join("../guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for watched in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "../guest-abi/src",
        "../guest-abi/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            guest_dir.join(watched).display()
        );
    }
    // One guest build for all profiles of this workspace: target/guest, beside target/debug.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|target| target.join("guest"))
        .unwrap_or_else(|| out_dir.join("guest"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let keep = key == "CARGO_HOME"
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_HTTP_")
            || key.starts_with("CARGO_REGISTRIES_");
        let leaks = key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || key == "RUSTFLAGS"
            || matches!(
                key.as_ref(),
                "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "CLIPPY_ARGS"
                    | "CLIPPY_CONF_DIR"
            );
        if leaks && !keep {
            build.env_remove(key.as_ref());
        }
    }
    let status = build.status().expect("cannot run cargo to build the guest");
    assert!(
        status.success(),
        "building the guest ({}) failed",
        guest_dir.display()
    );
    let image = target_dir.join("x86_64-unknown-linux-gnu/release/secondsite-guest");
    let embedded = out_dir.join("secondsite-guest.elf");
    std::fs::copy(&image, &embedded).expect("guest image was built");
    println!(
        "cargo:rustc-env=SECONDSITE_GUEST_IMAGE={}",
        embedded.display()
    );
}
