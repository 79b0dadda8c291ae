//! Link settings of the `outpost-edge` binary.
//!
//! Its relative relocations are packed (`-z pack-relative-relocs`, DT_RELR):
//! the position-independent binary otherwise carries 2.1 MB of them, which
//! the dynamic loader reads at every start and which then stay resident,
//! about 3 MB of a small node's memory (BENCHMARKS.md, "Resident memory").
//! The binary keeps address-space randomisation and needs glibc 2.36 or
//! newer (Debian 12, Ubuntu 24.04) and, to link, binutils 2.38 or lld 15.
//! `OUTPOST_EDGE_NO_RELR=1` at build time leaves them unpacked, for nodes
//! with an older glibc (2.34).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=OUTPOST_EDGE_NO_RELR");
    let opted_out = std::env::var("OUTPOST_EDGE_NO_RELR").is_ok_and(|v| !v.is_empty() && v != "0");
    if !opted_out
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
