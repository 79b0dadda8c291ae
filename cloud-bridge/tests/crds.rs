//! `deploy/crds.yaml` is generated from the Rust types (`outpost-cloud
//! crds`), never edited by hand: this test fails when it differs, and
//! rewrites it when run with `OUTPOST_UPDATE_CRDS=1`.

use std::path::PathBuf;

#[test]
fn deploy_crds_yaml_is_what_the_types_generate() {
    let generated = outpost_cloud_bridge::crd::crds_yaml().expect("the CRDs render");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds.yaml");
    if std::env::var_os("OUTPOST_UPDATE_CRDS").is_some() {
        std::fs::write(&path, &generated).expect("write deploy/crds.yaml");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "deploy/crds.yaml differs from the CRDs generated from cloud-bridge/src/crd.rs; \
         regenerate it with `OUTPOST_UPDATE_CRDS=1 cargo test --workspace --locked --test crds` \
         (or `outpost-cloud crds > deploy/crds.yaml`) and commit it"
    );
}

#[test]
fn the_crds_subcommand_prints_the_same_yaml() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost-cloud"))
        .arg("crds")
        .output()
        .expect("run outpost-cloud crds");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        outpost_cloud_bridge::crd::crds_yaml().expect("the CRDs render")
    );
}
