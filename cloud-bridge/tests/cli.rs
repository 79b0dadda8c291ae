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

#[test]
fn token_create_explains_its_flags_and_refuses_a_bad_ttl() {
    let bin = env!("CARGO_BIN_EXE_outpost-cloud");
    let out = Command::new(bin)
        .args(["token", "create", "--help"])
        .output()
        .expect("run outpost-cloud token create --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--node", "--ttl", "[default: 1h]", "--site"] {
        assert!(text.contains(flag), "--help shows {flag}: {text}");
    }
    let out = Command::new(bin)
        .args(["token", "create", "--node", "edge-1", "--ttl", "soon"])
        .output()
        .expect("run outpost-cloud token create");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a duration"), "{err}");
}

#[test]
fn run_explains_the_device_status_rate_and_refuses_nonsense() {
    let bin = env!("CARGO_BIN_EXE_outpost-cloud");
    let out = Command::new(bin)
        .args(["run", "--help"])
        .output()
        .expect("run outpost-cloud run --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for words in [
        "--device-status-writes-per-s",
        "[default: 20]",
        "OUTPOST_DEVICE_STATUS_WRITES_PER_S",
        "--metrics-listen",
        "[default: 127.0.0.1:9464]",
    ] {
        assert!(text.contains(words), "--help shows {words}: {text}");
    }
    let out = Command::new(bin)
        .args(["run", "--device-status-writes-per-s", "0"])
        .output()
        .expect("run outpost-cloud run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("positive number of writes a second"), "{err}");
}

#[test]
fn help_lists_the_crds_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-cloud"))
        .arg("--help")
        .output()
        .expect("run outpost-cloud --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("crds"), "{text}");
}
