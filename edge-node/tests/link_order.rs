//! The link order (`link-order.txt`, read by `build.rs`) is a list lld can
//! use: one mangled symbol per line, each once, under a header that says how
//! it is made. A malformed line would make lld skip or misread names silently,
//! and the node would only be larger.

use std::collections::HashSet;

#[test]
fn the_link_order_lists_each_function_once() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/link-order.txt");
    let text = std::fs::read_to_string(path).expect("read link-order.txt");
    assert!(
        text.starts_with("# ") && text.contains("scripts/link-order"),
        "the file starts with a header naming the script that makes it"
    );
    let mut seen = HashSet::new();
    let mut functions = 0;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        assert!(
            !line.is_empty() && !line.contains(char::is_whitespace) && !line.contains('#'),
            "line {}: {line:?} is not one symbol name",
            n + 1
        );
        assert!(seen.insert(line), "line {}: {line} is listed twice", n + 1);
        functions += 1;
    }
    // The agent's start-up alone runs thousands of functions: a short list
    // means the profiles missed the workload.
    assert!(functions > 3_000, "only {functions} functions listed");
}

/// `readelf` on the agent binary, as lld and the dynamic loader see it.
fn readelf(args: &[&str]) -> String {
    let out = std::process::Command::new("readelf")
        .args(args)
        .arg(env!("CARGO_BIN_EXE_outpost-edge"))
        .output()
        .expect("run readelf (binutils)");
    assert!(out.status.success(), "readelf {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The C++ standard library is linked in (`build.rs`): the shared one kept
/// about 1.5 MB resident in every agent. Linked in, its symbols must not be
/// exported either: thousands of them, 340 KB of tables read at each start.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn the_agent_carries_its_cxx_library_and_exports_nothing() {
    if option_env!("OUTPOST_EDGE_DYNAMIC_LIBSTDCXX").is_some_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    let dynamic = readelf(&["-d", "-W"]);
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(!needed.is_empty(), "no NEEDED entries in:\n{dynamic}");
    assert!(
        needed.iter().all(|l| !l.contains("libstdc++")),
        "the agent needs the shared libstdc++: {needed:?}"
    );
    // Columns: Num: Value Size Type Bind Vis Ndx Name; defined ones have an
    // index, not UND.
    let symbols = readelf(&["--dyn-syms", "-W"]);
    let defined = symbols
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(6)
                .is_some_and(|ndx| ndx.parse::<u32>().is_ok())
        })
        .count();
    assert!(defined < 100, "the agent exports {defined} dynamic symbols");
}
