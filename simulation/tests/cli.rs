//! The `outpost-sim` binary explains itself.

use std::process::Command;

#[test]
fn help_describes_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-sim"))
        .arg("--help")
        .output()
        .expect("run outpost-sim --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("simulation harness"),
        "--help says what outpost-sim is: {text}"
    );
    assert!(text.contains("Usage: outpost-sim"), "{text}");
}
