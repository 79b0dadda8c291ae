//! The real-stack mode: the quic-partition scenario passes for two seeds on
//! real iroh endpoints over the in-memory network, and a partition of that
//! network really stops traffic until it heals; a crashed edge restarts
//! from its store and catches up; unsupported events are refused.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::path::Path;
use std::time::Duration;

use outpost_simulation::quic::{self, QuicWorld};
use outpost_simulation::scenario::Scenario;
use outpost_sync::document::DocId;
use serde_json::json;

fn scenario() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/quic-partition.toml");
    Scenario::load(&path).unwrap()
}

async fn passes(seed: u64) {
    let r = quic::run(seed, scenario()).await.unwrap();
    assert!(
        r.passed(),
        "seed {seed} failed: {:?}\n{}",
        r.report.failures,
        r.table()
    );
    let report = &r.report;
    assert!(report.lag_ms.count > 0, "no lag samples:\n{}", r.table());
    assert!(report.lag_after_heal_ms.count > 0, "nothing after the heal");
    assert!(!report.fault_windows.is_empty());
    let heal = report
        .heals
        .iter()
        .find(|h| h.links_restored > 0)
        .unwrap_or_else(|| panic!("no heal gave links back: {:?}", report.heals));
    assert!(heal.caught_up_after_ms.is_some(), "{heal:?}");
    assert!(
        r.network.cut > 0,
        "the partition cut nothing: {:?}",
        r.network
    );
    assert!(report.messages > 0 && report.bytes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_partition_passes_seed_1() {
    passes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_partition_passes_seed_2() {
    passes(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_stops_traffic_until_it_heals() {
    let mut s = Scenario::default();
    s.fleet.clouds = 1;
    s.fleet.edges = 1;
    s.fleet.sites = 0;
    let world = QuicWorld::new(7, s).await.unwrap();
    let cloud = world.engine("cloud-0").unwrap();
    let edge = world.engine("edge-0").unwrap();
    let (c, e) = (
        world.node("cloud-0").unwrap(),
        world.node("edge-0").unwrap(),
    );
    let net = world.network().clone();
    let connected = async {
        while !edge.connected().contains(&cloud.me()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), connected)
        .await
        .expect("the edge connects to the cloud");

    net.cut(&[(c, e), (e, c)]);
    let cut_before = net.stats().cut;
    let d: DocId = "pod-spec/edge-0/default/app-9/uid-9".parse().unwrap();
    let v = json!({"containers": [{"name": "app", "image": "registry.local/app:v9"}]});
    assert!(cloud.write_json(&d, &v).unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        edge.read_json(&d).unwrap(),
        None,
        "the write crossed a full partition"
    );
    assert!(
        net.stats().cut > cut_before,
        "nothing tried to cross the cut"
    );

    net.uncut(&[(c, e), (e, c)]);
    let arrived = async {
        while edge.read_json(&d).unwrap().as_ref() != Some(&v) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), arrived)
        .await
        .expect("the write arrives after the heal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_edge_restarts_from_its_store_and_catches_up() {
    let text = r#"
name = "quic-crash"
duration = "10s"
[fleet]
clouds = 1
edges = 2
sites = 0
[network]
delay = { dist = "uniform", min = "2ms", max = "20ms" }
reorder = 0.05
duplicate = 0.02
[workload]
report_interval = "500ms"
api_interval = "250ms"
edge_desired_prob = 0.3
[checks]
liveness_bound = "3s"
settle_timeout = "20s"
[[event]]
kind = "crash"
at = "2s"
node = "edge-1"
restart_after = "3s"
[[event]]
kind = "one-way"
at = "6s"
for = "2s"
from = "edge-0"
to = "clouds"
"#;
    let s = Scenario::parse(text, Path::new("quic-crash.toml")).unwrap();
    let r = quic::run(5, s).await.unwrap();
    assert!(r.passed(), "{:?}\n{}", r.report.failures, r.table());
    assert_eq!((r.report.crashes, r.report.restarts), (1, 1));
    assert!(
        r.network.to_down > 0,
        "nothing was sent to the crashed edge"
    );
    assert!(r.network.held_back > 0 && r.network.duplicated > 0);
}

#[tokio::test]
async fn unsupported_events_are_refused() {
    let s = Scenario::parse(
        "duration = \"10s\"\n[[event]]\nkind = \"join\"\nat = \"1s\"",
        Path::new("join.toml"),
    )
    .unwrap();
    let err = quic::run(1, s).await.err().unwrap().to_string();
    assert!(err.contains("join"), "{err}");
}
