//! The sync-lag plot of a run, as SVG.
//!
//! One picture of a [`Report`]: simulated time across (seconds), sync lag up
//! (milliseconds, log scale), the median and 99th percentile of the changes
//! applied in each bin of time as lines and the largest as dots; every fault
//! window of the timeline shaded and labelled, moments (clock skew, joins,
//! departures) as dotted lines, every heal as a dashed line labelled with
//! the time the fleet took to catch up after it, and the moment the
//! workload stopped.
//!
//! The SVG is written by hand: it is text, and a plot this plain needs no
//! plotting library. Everything in it comes from the report's simulated
//! figures, never from host time, so the same seed gives the same bytes.
//! It is sized 800 x 400 and meant to be legible at that size.

use std::fmt::Write;

use crate::report::{FaultWindow, Report, human_ms};

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = WIDTH - 24.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = HEIGHT - 50.0;
/// Rough width of one character at font size 11, for placing labels.
const CHAR_PX: f64 = 6.6;
/// Height of one row of labels.
const LANE_PX: f64 = 13.0;
/// Rows of labels at the top (fault windows) and at the bottom (heals).
const LANES: usize = 4;

const P50: &str = "#1f77b4";
const P99: &str = "#d62728";
const MAX: &str = "#8c8c8c";
const HEAL: &str = "#2ca02c";

/// The fill of a fault window of `kind`.
fn fill(kind: &str) -> &'static str {
    match kind {
        "crash" => "#8d99ae",
        "network" => "#e9c46a",
        _ => "#f4a261",
    }
}

/// `text` with XML's special characters escaped.
fn esc(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            '\'' => s.push_str("&apos;"),
            c => s.push(c),
        }
    }
    s
}

/// Rows of labels: each label goes to the first row where it does not
/// overlap the one before it, or nowhere when every row is taken there (the
/// shapes carry their label as a tooltip, and the report lists them all).
struct Lanes {
    ends: [f64; LANES],
}

impl Lanes {
    fn new() -> Self {
        Self {
            ends: [f64::MIN; LANES],
        }
    }

    /// Places a label of `text` starting near `x`: its row and its x.
    fn place(&mut self, x: f64, text: &str) -> Option<(usize, f64)> {
        let width = text.chars().count() as f64 * CHAR_PX;
        let x = x.min(RIGHT - width).max(LEFT + 2.0);
        let lane = (0..LANES).find(|&l| self.ends[l] + 6.0 <= x)?;
        self.ends[lane] = x + width;
        Some((lane, x))
    }
}

/// The plot's scales: simulated ms to x, lag ms to y.
struct Scale {
    end_ms: f64,
    /// The top of the lag axis is 10^decades ms.
    decades: u32,
}

impl Scale {
    fn x(&self, ms: u64) -> f64 {
        LEFT + (RIGHT - LEFT) * (ms as f64 / self.end_ms).min(1.0)
    }

    fn y(&self, lag_ms: u64) -> f64 {
        let v = (lag_ms.max(1) as f64).log10() / f64::from(self.decades);
        BOTTOM - (BOTTOM - TOP) * v.min(1.0)
    }
}

/// A step between time ticks (seconds) that gives at most 10 ticks over `end_s`.
fn tick_step_s(end_s: f64) -> u64 {
    const STEPS: [u64; 12] = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];
    STEPS
        .into_iter()
        .find(|&s| end_s / s as f64 <= 10.0)
        .unwrap_or_else(|| (end_s / 10.0).ceil() as u64)
}

/// A label for a lag of 10^decade ms on the axis.
fn lag_label(decade: u32) -> String {
    let ms = 10u64.pow(decade);
    if ms < 1_000 {
        format!("{ms} ms")
    } else {
        format!("{} s", ms / 1_000)
    }
}

/// The sync-lag plot of `report`, as an SVG document.
pub fn lag_svg(report: &Report) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail; the results are ignored below.
    let largest = report
        .lag_over_time
        .iter()
        .map(|b| b.max)
        .max()
        .unwrap_or(1);
    let mut decades = 2;
    while decades < 9 && 10u64.pow(decades) < largest {
        decades += 1;
    }
    let scale = Scale {
        end_ms: report.simulated_ms.max(1) as f64,
        decades,
    };
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="11" fill="#222222">"##
    );
    let _ = writeln!(
        s,
        "<title>Sync lag of {} seed {}</title>",
        esc(&report.scenario),
        report.seed
    );
    let _ = writeln!(
        s,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    title(&mut s, report);
    legend(&mut s, report);
    axes(&mut s, &scale);
    faults(&mut s, &scale, &report.fault_windows);
    series(&mut s, &scale, report);
    fault_labels(&mut s, &scale, &report.fault_windows);
    heals(&mut s, &scale, report);
    s.push_str("</svg>\n");
    s
}

fn title(s: &mut String, r: &Report) {
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">Sync lag: scenario {}, seed {}</text>"#,
        esc(&r.scenario),
        r.seed
    );
    let changes: u64 = r.lag_over_time.iter().map(|b| b.count).sum();
    let _ = writeln!(
        s,
        r#"<text x="{RIGHT}" y="20" text-anchor="end">{} cloud{}, {} edges, {} sites; {changes} changes applied</text>"#,
        r.clouds,
        if r.clouds == 1 { "" } else { "s" },
        r.edges,
        r.sites
    );
}

fn legend(s: &mut String, r: &Report) {
    let y = 38.0;
    let line = |x: f64, color: &str, dash: &str| {
        format!(
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
            y - 4.0,
            x + 16.0,
            y - 4.0
        )
    };
    let bin = human_ms(r.lag_bin_ms);
    let items: [(&dyn Fn(f64) -> String, String); 5] = [
        (&|x| line(x, P50, ""), format!("p50 per {bin}")),
        (&|x| line(x, P99, ""), format!("p99 per {bin}")),
        (
            &|x| {
                format!(
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{MAX}"/>"#,
                    x + 8.0,
                    y - 4.0
                )
            },
            "max".into(),
        ),
        (
            &|x| {
                format!(
                    r#"<rect x="{x:.1}" y="{:.1}" width="16" height="10" fill="{}" fill-opacity="0.35"/>"#,
                    y - 9.0,
                    fill("partition")
                )
            },
            "fault window".into(),
        ),
        (
            &|x| line(x, HEAL, r#" stroke-dasharray="5 3""#),
            "heal (time to catch up)".into(),
        ),
    ];
    let mut x = LEFT;
    for (mark, text) in items {
        let _ = writeln!(s, "{}", mark(x));
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{y}">{}</text>"#,
            x + 20.0,
            esc(&text)
        );
        x += 20.0 + text.chars().count() as f64 * CHAR_PX + 14.0;
    }
}

fn axes(s: &mut String, scale: &Scale) {
    let _ = writeln!(s, r#"<g class="axes">"#);
    for d in 0..=scale.decades {
        let y = scale.y(10u64.pow(d));
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" stroke="#e3e3e3"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            lag_label(d)
        );
    }
    let end_s = scale.end_ms / 1e3;
    let step = tick_step_s(end_s);
    let mut t = 0;
    while t as f64 <= end_s {
        let x = scale.x(t * 1_000);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{BOTTOM}" x2="{x:.1}" y2="{:.1}" stroke="#444"/>"##,
            BOTTOM + 4.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{t}</text>"#,
            BOTTOM + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
        RIGHT - LEFT,
        BOTTOM - TOP
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">simulated time (s) at which a replica applied the change</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 32.0
    );
    let (cx, cy) = (16.0, (TOP + BOTTOM) / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{cx}" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 {cx} {cy:.1})">sync lag, commit to applied (ms, log scale)</text>"#
    );
    let _ = writeln!(s, "</g>");
}

/// A label with a white halo, so it reads over lines and shading.
fn label(s: &mut String, x: f64, y: f64, color: &str, text: &str) {
    let _ = writeln!(
        s,
        r##"<text x="{x:.1}" y="{y:.1}" fill="{color}" stroke="#ffffff" stroke-width="3" paint-order="stroke">{}</text>"##,
        esc(text)
    );
}

fn faults(s: &mut String, scale: &Scale, windows: &[FaultWindow]) {
    let _ = writeln!(s, r#"<g class="faults">"#);
    for w in windows {
        let (x0, x1) = (scale.x(w.start_ms), scale.x(w.end_ms));
        if w.is_window() {
            let _ = writeln!(
                s,
                r#"<rect class="fault" x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="{}" fill-opacity="0.3"><title>{} from {:.1} s to {:.1} s</title></rect>"#,
                (x1 - x0).max(1.0),
                BOTTOM - TOP,
                fill(&w.kind),
                esc(&w.label),
                w.start_ms as f64 / 1e3,
                w.end_ms as f64 / 1e3
            );
        } else {
            let _ = writeln!(
                s,
                r##"<line class="moment" x1="{x0:.1}" y1="{TOP}" x2="{x0:.1}" y2="{BOTTOM}" stroke="#555555" stroke-dasharray="1 3"><title>{} at {:.1} s</title></line>"##,
                esc(&w.label),
                w.start_ms as f64 / 1e3
            );
        }
    }
    let _ = writeln!(s, "</g>");
}

/// The faults' labels, over the lines.
fn fault_labels(s: &mut String, scale: &Scale, windows: &[FaultWindow]) {
    let _ = writeln!(s, r#"<g class="fault-labels">"#);
    let mut lanes = Lanes::new();
    for w in windows {
        if let Some((lane, x)) = lanes.place(scale.x(w.start_ms) + 3.0, &w.label) {
            label(
                s,
                x,
                TOP + 12.0 + lane as f64 * LANE_PX,
                "#6b3a0a",
                &w.label,
            );
        }
    }
    let _ = writeln!(s, "</g>");
}

fn series(s: &mut String, scale: &Scale, r: &Report) {
    let bins = &r.lag_over_time;
    if bins.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no change was applied</text>"#,
            (LEFT + RIGHT) / 2.0,
            (TOP + BOTTOM) / 2.0
        );
        return;
    }
    let half = r.lag_bin_ms / 2;
    let _ = writeln!(s, r#"<g class="max" fill="{MAX}">"#);
    for b in bins {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6"/>"#,
            scale.x(b.start_ms + half),
            scale.y(b.max)
        );
    }
    let _ = writeln!(s, "</g>");
    for (class, color, pick) in [
        ("p99", P99, (|b| b.p99) as fn(&crate::report::LagBin) -> u64),
        ("p50", P50, |b| b.p50),
    ] {
        let mut d = String::new();
        let mut last: Option<u64> = None;
        for b in bins {
            // A bin without changes breaks the line.
            let join = last.is_some_and(|l| b.start_ms <= l + r.lag_bin_ms);
            let _ = write!(
                d,
                "{}{:.1} {:.1} ",
                if join { "L" } else { "M" },
                scale.x(b.start_ms + half),
                scale.y(pick(b))
            );
            last = Some(b.start_ms);
        }
        let _ = writeln!(
            s,
            r#"<path class="{class}" d="{}" fill="none" stroke="{color}" stroke-width="1.6" stroke-linejoin="round"/>"#,
            d.trim_end()
        );
    }
}

fn heals(s: &mut String, scale: &Scale, r: &Report) {
    let _ = writeln!(s, r#"<g class="heals">"#);
    let mut lanes = Lanes::new();
    let mut marks: Vec<(u64, String, &str, &str)> = r
        .heals
        .iter()
        .map(|h| {
            let text = h.caught_up_after_ms.map_or("healed".into(), |ms| {
                format!("caught up in {}", human_ms(ms))
            });
            (h.at_ms, text, HEAL, r#" stroke-dasharray="5 3""#)
        })
        .collect();
    marks.push((
        r.workload_stop_ms,
        "workload stops".into(),
        "#555555",
        r#" stroke-dasharray="1 3""#,
    ));
    for (at_ms, text, color, dash) in marks {
        let x = scale.x(at_ms);
        let class = if color == HEAL { "heal" } else { "stop" };
        let _ = writeln!(
            s,
            r#"<line class="{class}" x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="{color}" stroke-width="1.5"{dash}/>"#
        );
        if let Some((lane, lx)) = lanes.place(x + 3.0, &text) {
            label(
                s,
                lx,
                BOTTOM - 5.0 - lane as f64 * LANE_PX,
                if color == HEAL { "#1b6e1b" } else { color },
                &text,
            );
        }
    }
    let _ = writeln!(s, "</g>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc(r#"a<b & "c" 'd'>"#),
            "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;"
        );
    }

    #[test]
    fn ticks_stay_few() {
        assert_eq!(tick_step_s(9.0), 1);
        assert_eq!(tick_step_s(150.0), 15);
        assert_eq!(tick_step_s(400.0), 60);
        assert_eq!(tick_step_s(100_000.0), 10_000);
    }

    #[test]
    fn labels_take_the_first_free_row() {
        let mut lanes = Lanes::new();
        let mut row = |x, t| lanes.place(x, t).map(|(lane, _)| lane);
        assert_eq!(row(100.0, "abcdef"), Some(0));
        assert_eq!(row(110.0, "abcdef"), Some(1));
        assert_eq!(row(200.0, "abcdef"), Some(0));
        assert_eq!(row(120.0, "abcdef"), Some(2));
        assert_eq!(row(130.0, "abcdef"), Some(3));
        assert_eq!(row(140.0, "abcdef"), None);
    }
}
