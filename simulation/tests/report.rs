//! Reports: the sync-lag plot (well-formed SVG, one shaded window per fault,
//! one mark per heal, the same bytes for the same seed), the time to catch
//! up after each heal, the plot written beside the JSON report, and the
//! README's plot, which must be what its command makes.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_simulation::plot::lag_svg;
use outpost_simulation::{Report, Scenario, run};

/// A small fleet with three partitions (one of them of two sites that share
/// no link), a crash with a restart, and a clock skew (a moment, not a window).
const THREE_PARTITIONS: &str = r#"
name = "three-partitions"
duration = "60s"
[fleet]
edges = 4
sites = 2
[workload]
report_interval = "2s"
api_interval = "500ms"
[checks]
liveness_bound = "15s"
settle_timeout = "1m"
[[event]]
kind = "partition"
at = "5s"
for = "5s"
a = "clouds"
b = "site:site-0"
[[event]]
kind = "crash"
at = "12s"
node = "edge-1"
restart_after = "4s"
[[event]]
kind = "skew"
at = "15s"
node = "edge-2"
skew_ms = 20000
[[event]]
kind = "partition"
at = "20s"
for = "8s"
a = "clouds"
b = "edge-3"
[[event]]
kind = "partition"
at = "35s"
for = "10s"
a = "site:site-0"
b = "site:site-1"
"#;

fn three_partitions() -> Scenario {
    Scenario::parse(THREE_PARTITIONS, Path::new("three-partitions.toml")).unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost-sim"))
}

/// Checks that `text` is well-formed XML with one root element named
/// `root`: tags nest and close, attributes are quoted, `<` and `&` appear
/// only as markup or entities. Returns the element names in document order.
fn well_formed(text: &str, root: &str) -> Vec<String> {
    fn name_end(s: &str) -> usize {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || "-_:.".contains(c)))
            .unwrap_or(s.len())
    }
    fn check_text(t: &str) {
        assert!(!t.contains('<'), "a stray < in {t:?}");
        let mut rest = t;
        while let Some(i) = rest.find('&') {
            let end = rest[i..]
                .find(';')
                .unwrap_or_else(|| panic!("& without ; in {t:?}"));
            let entity = &rest[i + 1..i + end];
            assert!(
                ["amp", "lt", "gt", "quot", "apos"].contains(&entity)
                    || (entity.starts_with('#') && entity[1..].chars().all(|c| c.is_ascii_digit())),
                "unknown entity &{entity}; in {t:?}"
            );
            rest = &rest[i + end..];
        }
    }
    let mut stack: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut rest = text.trim_start();
    let mut roots = 0;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            check_text(rest);
            assert!(
                rest.trim().is_empty() || !stack.is_empty(),
                "text outside the root"
            );
            break;
        };
        check_text(&rest[..lt]);
        assert!(
            rest[..lt].trim().is_empty() || !stack.is_empty(),
            "text outside the root: {:?}",
            &rest[..lt]
        );
        rest = &rest[lt..];
        if let Some(r) = rest.strip_prefix("<!--") {
            rest = &r[r.find("-->").unwrap() + 3..];
        } else if let Some(r) = rest.strip_prefix("<?") {
            rest = &r[r.find("?>").unwrap() + 2..];
        } else if let Some(r) = rest.strip_prefix("</") {
            let n = name_end(r);
            let open = stack
                .pop()
                .unwrap_or_else(|| panic!("</{}> closes nothing", &r[..n]));
            assert_eq!(open, &r[..n], "<{open}> closed by </{}>", &r[..n]);
            let gt = r.find('>').unwrap();
            assert!(r[n..gt].trim().is_empty());
            rest = &r[gt + 1..];
        } else {
            let r = &rest[1..];
            let n = name_end(r);
            assert!(
                n > 0,
                "an empty tag name at {:?}",
                &rest[..rest.len().min(40)]
            );
            let name = r[..n].to_string();
            if stack.is_empty() {
                roots += 1;
                assert_eq!(name, root, "the root element");
            }
            // Attributes: name="value" pairs up to > or />.
            let mut a = &r[n..];
            let self_closing = loop {
                a = a.trim_start();
                if let Some(after) = a.strip_prefix("/>") {
                    a = after;
                    break true;
                }
                if let Some(after) = a.strip_prefix('>') {
                    a = after;
                    break false;
                }
                let an = name_end(a);
                assert!(
                    an > 0,
                    "<{name}>: a bad attribute at {:?}",
                    &a[..a.len().min(40)]
                );
                let v = a[an..].trim_start().strip_prefix('=').unwrap().trim_start();
                let quote = v.chars().next().unwrap();
                assert!(
                    quote == '"' || quote == '\'',
                    "<{name}>: an unquoted attribute"
                );
                let close = v[1..].find(quote).unwrap();
                check_text(&v[1..1 + close]);
                a = &v[close + 2..];
            };
            names.push(name.clone());
            if !self_closing {
                stack.push(name);
            }
            rest = a;
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    assert_eq!(roots, 1, "one root element");
    names
}

#[test]
fn the_well_formedness_check_catches_broken_xml() {
    well_formed(
        r#"<svg a="1"><g><text>a &amp; b</text><rect/></g></svg>"#,
        "svg",
    );
    for bad in [
        "<svg><g></svg>",
        "<svg>a & b</svg>",
        "<svg a=1></svg>",
        "<svg></svg><svg></svg>",
        "<svg><rect></svg>",
        r#"<svg a="<"></svg>"#,
    ] {
        let r = std::panic::catch_unwind(|| well_formed(bad, "svg"));
        assert!(r.is_err(), "{bad} passed");
    }
}

#[test]
fn the_plot_is_well_formed_svg_with_its_parts() {
    let r = run(2, three_partitions()).unwrap();
    assert!(r.passed(), "{:?}", r.failures);
    let svg = lag_svg(&r);
    let names = well_formed(&svg, "svg");
    assert!(svg.starts_with(r#"<svg xmlns="http://www.w3.org/2000/svg" width="800" height="400""#));
    assert!(
        names.iter().filter(|n| *n == "path").count() == 2,
        "p50 and p99 lines"
    );
    assert!(names.iter().any(|n| n == "circle"), "max dots");
    for text in [
        "Sync lag: scenario three-partitions, seed 2",
        "ms, log scale",
        "simulated time (s)",
        "partition clouds | site:site-0",
        "crash edge-1",
        "skew edge-2 +20 s",
        "caught up in",
        "workload stops",
    ] {
        assert!(svg.contains(text), "the plot lacks {text:?}:\n{svg}");
    }
}

#[test]
fn one_shaded_window_per_fault_and_one_mark_per_heal() {
    let r = run(2, three_partitions()).unwrap();
    let windows: Vec<(&str, u64, u64)> = r
        .fault_windows
        .iter()
        .map(|w| (w.kind.as_str(), w.start_ms, w.end_ms))
        .collect();
    assert_eq!(
        windows,
        [
            ("partition", 5_000, 10_000),
            ("crash", 12_000, 16_000),
            ("skew", 15_000, 15_000),
            ("partition", 20_000, 28_000),
            ("partition", 35_000, 45_000),
        ]
    );
    let svg = lag_svg(&r);
    // Three partitions and a crash are windows; the skew is a moment.
    assert_eq!(svg.matches(r#"<rect class="fault""#).count(), 4, "{svg}");
    assert_eq!(svg.matches(r#"<line class="moment""#).count(), 1, "{svg}");
    assert_eq!(r.heals.len(), 4, "{:?}", r.heals);
    assert_eq!(svg.matches(r#"<line class="heal""#).count(), 4, "{svg}");
    // Two partitions cut links and the crash took edge-1's; the partition
    // of the two sites cut none (edges link only within their site).
    let restored: Vec<(u64, u64)> = r
        .heals
        .iter()
        .map(|h| (h.at_ms, h.links_restored))
        .collect();
    assert!(restored.iter().take(3).all(|&(_, n)| n > 0), "{restored:?}");
    assert_eq!(restored[3], (45_000, 0));
    assert!(r.heals[3].caught_up_after_ms.is_none());
    let table = r.table();
    assert!(table.contains("caught up after each heal"), "{table}");
}

#[test]
fn each_heal_reports_when_the_backlog_arrived() {
    let path = repo().join("simulation/scenarios/partition-heal.toml");
    let r = run(1, Scenario::load(&path).unwrap()).unwrap();
    assert!(r.passed(), "{:?}", r.failures);
    assert_eq!(r.heals.len(), 1, "{:?}", r.heals);
    let heal = &r.heals[0];
    assert_eq!(heal.at_ms, 60_000);
    assert_eq!(heal.healed, ["partition clouds | site:site-0"]);
    // The site's three edges get their cloud link back.
    assert_eq!(heal.links_restored, 3);
    // The edges redial on their back-off, which grew through the 40 s
    // partition: the backlog arrives seconds after the heal, and then lag
    // is back to tens of milliseconds.
    let after = heal.caught_up_after_ms.unwrap();
    assert!((1_000..=31_000).contains(&after), "{after}");
    let backlog = r
        .lag_over_time
        .iter()
        .find(|b| b.start_ms >= heal.at_ms && b.max > 20_000)
        .unwrap();
    assert!(backlog.start_ms <= heal.at_ms + after, "{backlog:?}");
    let settled = r
        .lag_over_time
        .iter()
        .filter(|b| b.start_ms > heal.at_ms + after + 2_000);
    assert!(settled.clone().count() > 10);
    assert!(
        settled.clone().all(|b| b.p99 < 1_000),
        "{:?}",
        r.lag_over_time
    );
}

#[test]
fn the_same_seed_gives_a_byte_identical_plot() {
    let a = lag_svg(&run(3, three_partitions()).unwrap());
    let b = lag_svg(&run(3, three_partitions()).unwrap());
    assert!(a == b, "two runs of seed 3 drew different plots");
    let c = lag_svg(&run(4, three_partitions()).unwrap());
    assert!(a != c, "seeds 3 and 4 drew the same plot");
}

#[test]
fn a_run_writes_its_plot_beside_its_json_report() {
    let dir = std::env::temp_dir().join(format!("outpost-sim-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("three-partitions.toml");
    std::fs::write(&scenario, THREE_PARTITIONS).unwrap();
    let out = sim()
        .args(["run", "--seed", "2", "--scenario"])
        .arg(&scenario)
        .arg("--report")
        .arg(dir.join("run.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("caught up after each heal"), "{stdout}");
    let json = std::fs::read_to_string(dir.join("run.json")).unwrap();
    let report: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(report.heals.len(), 4);
    assert!(report.heals.iter().any(|h| h.caught_up_after_ms.is_some()));
    assert_eq!(report.fault_windows.len(), 5);
    assert!(!report.lag_over_time.is_empty() && report.lag_bin_ms > 0);
    // The plot beside it is the JSON report's, drawn again.
    let svg = std::fs::read_to_string(dir.join("run.svg")).unwrap();
    assert_eq!(svg, lag_svg(&report));
    // --plot puts it elsewhere.
    let out = sim()
        .args(["run", "--seed", "2", "--scenario"])
        .arg(&scenario)
        .arg("--plot")
        .arg(dir.join("elsewhere.svg"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("elsewhere.svg")).unwrap(),
        svg
    );
    let help = sim().args(["run", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--plot"));
    let _ = std::fs::remove_dir_all(dir);
}

/// The README's plot is made by the command written in its scenario file;
/// running that command again must give the committed file, byte for byte.
#[test]
fn the_readme_plot_is_what_its_command_makes() {
    const PLOT: &str = "docs/sync-lag-partition-heal.svg";
    let root = repo();
    let scenario =
        std::fs::read_to_string(root.join("simulation/scenarios/partition-heal.toml")).unwrap();
    let command = scenario
        .lines()
        .filter_map(|l| {
            l.trim_start_matches('#')
                .trim()
                .strip_prefix("outpost-sim ")
        })
        .find(|c| c.contains(PLOT))
        .expect("the scenario file says how the plot is made");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("outpost-sim {command}")),
        "the README gives the same command: outpost-sim {command}"
    );
    assert!(
        readme.contains(&format!("]({PLOT})")),
        "the README shows {PLOT}"
    );
    let dir = std::env::temp_dir().join(format!("outpost-sim-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fresh = dir.join("plot.svg");
    // The command, writing its plot into a temporary file instead.
    let args: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
    let at = args.iter().position(|a| a == PLOT).unwrap();
    let out = sim()
        .current_dir(&root)
        .args(&args[..at])
        .arg(&fresh)
        .args(&args[at + 1..])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let committed = std::fs::read_to_string(root.join(PLOT)).unwrap();
    let made = std::fs::read_to_string(&fresh).unwrap();
    assert!(
        made == committed,
        "{PLOT} is not what `outpost-sim {command}` makes now; run it from the repository root and commit the result"
    );
    well_formed(&committed, "svg");
    let _ = std::fs::remove_dir_all(dir);
}
