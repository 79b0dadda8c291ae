//! The fleet's Prometheus and Grafana files in `deploy/`: the recording and
//! alerting rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), every alert is labelled with a severity,
//! annotated, and tested both firing and not firing; the scrape config passes
//! `promtool check config`; the Grafana dashboard has a fixed uid, every panel
//! reads from the datasource variable, and every panel's query (variables
//! substituted) is accepted by the test environment's real Prometheus.
//!
//! That a real fleet's scrape returns data for every panel is not checked
//! here: only that Prometheus parses and evaluates each query.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_sync::test_utils::env_value;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RULES: &str = "deploy/prometheus/rules/outpost.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/tests/outpost.rules.test.yml";
const SCRAPE_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/outpost-fleet.json";
const DASHBOARD_UID: &str = "outpost-fleet";
const DATASOURCE: &str = "${datasource}";

/// A path of the repository, from the simulation crate's folder.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs promtool and fails with everything it printed unless it succeeds.
fn promtool(args: &[&str], path: &str) {
    let output = Command::new("promtool")
        .args(args)
        .arg(repo(path))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool: {e}: start the test environment with `scripts/env up`, which installs it"
            )
        });
    assert!(
        output.status.success(),
        "promtool {} {path} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

#[test]
fn rules_pass_promtool_check() {
    promtool(&["check", "rules"], RULES);
}

#[test]
fn rules_pass_their_promtool_unit_tests() {
    promtool(&["test", "rules"], RULE_TESTS);
}

#[test]
fn scrape_config_passes_promtool_check() {
    // Also checks the rule files it names and the example targets file.
    promtool(&["check", "config"], SCRAPE_CONFIG);
}

/// The rules of the rules file, read line by line: name (`alert` or
/// `record`) to the rule's text. The file keeps one rule per `- alert:` or
/// `- record:` item, which is all this needs.
fn rules() -> BTreeMap<(String, String), String> {
    let mut rules = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in read(RULES).lines() {
        let item = line.trim_start();
        let start = ["alert", "record"].into_iter().find_map(|kind| {
            item.strip_prefix(&format!("- {kind}:"))
                .map(|name| (kind.to_owned(), name.trim().to_owned()))
        });
        if let Some(key) = start {
            current = Some(key.clone());
            rules.insert(key, String::new());
        } else if item.starts_with("- name:") {
            current = None;
        } else if let Some(key) = &current {
            let text = rules.get_mut(key).unwrap();
            text.push_str(line);
            text.push('\n');
        }
    }
    rules
}

#[test]
fn every_alert_has_a_severity_and_annotations_and_is_tested_both_ways() {
    let rules = rules();
    let alerts: Vec<_> = rules.keys().filter(|(kind, _)| kind == "alert").collect();
    assert!(alerts.len() >= 4, "alerts found: {alerts:?}");
    for key in &alerts {
        let text = &rules[*key];
        for needed in ["severity:", "summary:", "description:"] {
            assert!(text.contains(needed), "alert {} has no {needed}", key.1);
        }
    }

    // Per alert in the unit tests: evaluated with alerts expected, and
    // evaluated with none expected.
    let mut firing = BTreeMap::<String, bool>::new();
    let mut quiet = BTreeMap::<String, bool>::new();
    let mut current = None;
    for line in read(RULE_TESTS).lines() {
        let item = line.trim();
        if let Some(name) = item.strip_prefix("- alertname:") {
            current = Some(name.trim().to_owned());
        } else if let Some(name) = &current {
            if item == "exp_alerts: []" {
                quiet.insert(name.clone(), true);
            } else if item == "exp_alerts:" {
                firing.insert(name.clone(), true);
            }
        }
    }
    for (_, name) in &alerts {
        assert!(
            firing.contains_key(name),
            "{name}: no unit test where it fires"
        );
        assert!(
            quiet.contains_key(name),
            "{name}: no unit test where it does not fire"
        );
    }
    let tests = read(RULE_TESTS);
    for (_, name) in rules.keys().filter(|(kind, _)| kind == "record") {
        assert!(
            tests.contains(&format!("expr: {name}")) || tests.contains(&format!("({name}")),
            "recording rule {name} has no promql_expr_test"
        );
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap()
}

/// Every panel, rows' collapsed panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn variable<'a>(dashboard: &'a Value, name: &str) -> &'a Value {
    dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no variable {name}"))
}

#[test]
fn dashboard_has_a_fixed_uid_and_every_panel_reads_the_datasource_variable() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], DASHBOARD_UID);

    let datasource = variable(&dashboard, "datasource");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");

    let node = variable(&dashboard, "node");
    assert_eq!(node["type"], "query");
    assert_eq!(node["datasource"]["uid"], DATASOURCE);
    let query = node["query"]["query"].as_str().unwrap();
    assert!(
        query.starts_with("label_values(") && query.ends_with(", node)"),
        "{query}"
    );
    assert_eq!(node["includeAll"], true);
    assert_eq!(node["allValue"], ".*");

    let panels = panels(&dashboard);
    let mut exprs = Vec::new();
    for panel in &panels {
        if panel["type"] == "row" {
            continue;
        }
        let title = &panel["title"];
        assert_eq!(panel["datasource"]["uid"], DATASOURCE, "panel {title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], DATASOURCE, "panel {title}");
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains("$node"),
                "panel {title} ignores $node: {expr}"
            );
            exprs.push(expr);
        }
    }

    // The panels issue #8 asks for, by what they query.
    let all = exprs.join("\n");
    for needed in [
        "histogram_quantile(0.5, sum by (le) (rate(outpost_sync_lag_seconds_bucket",
        "histogram_quantile(0.9, sum by (le) (rate(outpost_sync_lag_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(outpost_sync_lag_seconds_bucket",
        "time() - max by (role, node, peer) (outpost_sync_peer_watermark_timestamp_seconds",
        "outpost_sync_pending_documents",
        "outpost_sync_sent_bytes_total",
        "outpost_sync_received_bytes_total",
        "outpost_sync_sent_messages_total",
        "outpost_sync_received_messages_total",
        "outpost_sync_connected_peers",
        "outpost_edge_pods",
        "outpost_edge_devices{state=\"online\"",
        "outpost_mapper_errors_total",
    ] {
        assert!(all.contains(needed), "no panel queries {needed}");
    }
    assert!(
        panels
            .iter()
            .any(|p| p["type"] == "heatmap" && p["targets"][0]["format"] == "heatmap"),
        "no sync-lag heatmap"
    );
}

/// A panel's query as Grafana would send it with every node selected.
fn substitute(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${node}", ".*")
        .replace("$node", ".*");
    assert!(!out.contains('$'), "a variable left in {out}");
    out
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; the JSON answer, whatever its status.
async fn query(base: &str, promql: &str) -> Value {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!(
        "GET /api/v1/query?query={} HTTP/1.0\r\nHost: {host}\r\n\r\n",
        percent_encode(promql)
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (_, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[tokio::test]
async fn every_dashboard_query_is_accepted_by_prometheus() {
    let base = env_value("OUTPOST_PROMETHEUS_URL").unwrap_or_else(|e| panic!("{e}"));

    // The check can fail: a query Prometheus cannot parse answers "error".
    let broken = query(&base, "sum(rate(outpost_sync_sent_bytes_total[1m])").await;
    assert_eq!(broken["status"], "error", "{broken}");

    let dashboard = dashboard();
    let mut queries = Vec::new();
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            queries.push((panel["title"].to_string(), substitute(expr)));
        }
    }
    // The node variable's own query: the series selector inside label_values.
    let node_query = variable(&dashboard, "node")["query"]["query"]
        .as_str()
        .unwrap();
    let selector = node_query
        .trim_start_matches("label_values(")
        .trim_end_matches(", node)");
    queries.push(("variable node".to_owned(), selector.to_owned()));

    assert!(queries.len() >= 15, "{} queries", queries.len());
    for (title, promql) in &queries {
        let answer = query(&base, promql).await;
        assert_eq!(
            answer["status"], "success",
            "panel {title}: Prometheus refused {promql}: {answer}"
        );
    }
}

/// The local fleet (`scripts/run`), scraped by the environment's
/// Prometheus: every panel's query returns data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_fleet_fills_every_panel() {
    let base = env_value("OUTPOST_PROMETHEUS_URL").unwrap_or_else(|e| panic!("{e}"));
    let log = std::env::temp_dir().join("outpost-fleet-panels.log");
    let mut fleet = std::process::Command::new(repo("scripts/run"))
        .args(["--duration", "600"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .expect("start scripts/run");
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // The script's trap deletes the example workload and stops
            // the processes it started.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0.to_string()])
                .status();
        }
    }
    let stop = Stop(fleet.id());

    let dashboard = dashboard();
    let mut queries = Vec::new();
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            queries.push((panel["title"].to_string(), substitute(expr)));
        }
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(420);
    let mut empty: Vec<String> = Vec::new();
    loop {
        if let Some(status) = fleet.try_wait().unwrap() {
            panic!(
                "scripts/run exited ({status}) before the panels had data: {}",
                std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
            );
        }
        let up = query(&base, "count(up{job=\"outpost\"} == 1)").await;
        if up["data"]["result"][0]["value"][1] == "4" {
            empty.clear();
            for (title, promql) in &queries {
                let answer = query(&base, promql).await;
                let results = answer["data"]["result"].as_array().map_or(0, Vec::len);
                if results == 0 {
                    empty.push(format!("{title}: {promql}"));
                }
            }
            if empty.is_empty() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "panels without data after the fleet started: {empty:#?}\n{}",
            std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    drop(stop);
    let _ = fleet.wait();
}
