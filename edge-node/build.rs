//! Link settings of the `outpost-edge` binary, chosen for a small node's
//! memory (BENCHMARKS.md, "Resident memory").
//!
//! - Its relative relocations are packed (`-z pack-relative-relocs`,
//!   DT_RELR): the position-independent binary otherwise carries 2.1 MB of
//!   them, which the dynamic loader reads at every start and which then stay
//!   resident, about 3 MB. The binary keeps address-space randomisation and
//!   needs glibc 2.36 or newer (Debian 12, Ubuntu 24.04) and, to link,
//!   binutils 2.38 or lld 15. `OUTPOST_EDGE_NO_RELR=1` at build time leaves
//!   them unpacked, for nodes with an older glibc (2.34).
//! - Its code is laid out in the order of `link-order.txt`: the functions a
//!   node runs first, together, the rest after. The kernel maps executable
//!   pages around every fault (whole large folios on recent kernels), so hot
//!   code scattered over the 29 MB of `.text` kept about 15 MB of it resident;
//!   grouped, about 8 MB. The file lists mangled symbol names, which depend
//!   on the target and on the dependencies' versions and features: it is
//!   used for x86_64 Linux (GNU), whose default linker is lld, and
//!   `scripts/link-order` regenerates it. Names the build no longer has are
//!   skipped; a stale file costs memory, never correctness.
//!   `OUTPOST_EDGE_NO_LINK_ORDER=1` turns it off (for a linker other than
//!   lld).
//! - The C++ standard library (RocksDB's) is linked statically. The shared
//!   `libstdc++` kept about 1.5 MB resident in every agent (its code, and the
//!   symbol and relocation tables the loader reads at start); linked in, only
//!   the members RocksDB uses come along, and their hot code joins the link
//!   order. `OUTPOST_EDGE_DYNAMIC_LIBSTDCXX=1` at build time links the shared
//!   library instead.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=OUTPOST_EDGE_NO_RELR");
    println!("cargo:rerun-if-env-changed=OUTPOST_EDGE_NO_LINK_ORDER");
    let target = |key: &str| std::env::var(key).unwrap_or_default();
    let set = |key: &str| std::env::var(key).is_ok_and(|v| !v.is_empty() && v != "0");
    let linux_gnu =
        target("CARGO_CFG_TARGET_OS") == "linux" && target("CARGO_CFG_TARGET_ENV") == "gnu";
    println!("cargo:rerun-if-env-changed=OUTPOST_EDGE_DYNAMIC_LIBSTDCXX");
    if linux_gnu && !set("OUTPOST_EDGE_DYNAMIC_LIBSTDCXX") {
        // Given to the library target, so every binary linking it, and
        // listed before RocksDB's own `-lstdc++` (a shared library): the
        // linker takes the archive's members and drops the shared library.
        println!("cargo:rustc-link-lib=static:-bundle=stdc++");
        // The shared library stays on the command line, so the linker would
        // export every C++ symbol the binary defines in its place (340 KB of
        // dynamic symbol tables, read at every start); nothing needs them.
        println!("cargo:rustc-link-arg-bins=-Wl,--exclude-libs,ALL");
    }
    if linux_gnu && !set("OUTPOST_EDGE_NO_RELR") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if linux_gnu
        && target("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && !set("OUTPOST_EDGE_NO_LINK_ORDER")
    {
        let order = std::path::Path::new(&target("CARGO_MANIFEST_DIR")).join("link-order.txt");
        // The linker reads a copy in OUT_DIR, not the checkout's file: the
        // target dir is shared by every clone, and cargo reuses this
        // script's output for a clone at another path (its fingerprint does
        // not name the path). A path into a clone since removed would then
        // fail the link.
        let copy = std::path::Path::new(&target("OUT_DIR")).join("link-order.txt");
        if order.is_file() {
            match std::fs::copy(&order, &copy) {
                Ok(_) => {
                    println!(
                        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
                        copy.display()
                    );
                    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
                }
                Err(err) => println!(
                    "cargo:warning=link order not used: copying {} to {}: {err}",
                    order.display(),
                    copy.display()
                ),
            }
        }
    }
}
