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
