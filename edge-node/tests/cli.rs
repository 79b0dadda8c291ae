//! The `outpost-edge` binary explains itself.

use std::process::Command;

#[test]
fn help_describes_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-edge"))
        .arg("--help")
        .output()
        .expect("run outpost-edge --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("edge agent"),
        "--help says what outpost-edge is: {text}"
    );
    assert!(text.contains("Usage: outpost-edge"), "{text}");
}
