//! The `outpost-cloud` binary explains itself.

use std::process::Command;

#[test]
fn help_describes_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-cloud"))
        .arg("--help")
        .output()
        .expect("run outpost-cloud --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Kubernetes API"),
        "--help says what outpost-cloud is: {text}"
    );
    assert!(text.contains("Usage: outpost-cloud"), "{text}");
}
