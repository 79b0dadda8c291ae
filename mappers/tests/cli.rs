//! The `outpost-mapper` binary explains itself.

use std::process::Command;

#[test]
fn help_describes_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-mapper"))
        .arg("--help")
        .output()
        .expect("run outpost-mapper --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("device mapper"),
        "--help says what outpost-mapper is: {text}"
    );
    assert!(text.contains("Usage: outpost-mapper"), "{text}");
}
