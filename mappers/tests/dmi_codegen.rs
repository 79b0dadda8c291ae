//! The committed DMI code is what the .proto generates.
//!
//! The Rust code for `proto/dmi/v1beta1/api.proto` is committed, so that
//! ordinary builds need no `protoc`. This test regenerates it and fails on any
//! difference; run it with `OUTPOST_REGENERATE=1` to rewrite the committed
//! file after changing the .proto.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;

#[test]
fn generated_dmi_code_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out =
        std::env::temp_dir().join(outpost_sync::test_utils::unique_name("outpost-dmi-codegen"));
    std::fs::create_dir_all(&out).unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&out)
        .compile_protos(
            &[root.join("proto/dmi/v1beta1/api.proto")],
            &[root.join("proto")],
        )
        .expect("protoc (apt-get install protobuf-compiler) compiles the DMI proto");
    let fresh = std::fs::read_to_string(out.join("v1beta1.rs")).unwrap();
    let committed_path = root.join("src/dmi/v1beta1.generated.rs");
    let _ = std::fs::remove_dir_all(&out);
    if std::env::var_os("OUTPOST_REGENERATE").is_some() {
        std::fs::write(&committed_path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale: run OUTPOST_REGENERATE=1 cargo test -p outpost-mappers --test dmi_codegen",
        committed_path.display()
    );
}
