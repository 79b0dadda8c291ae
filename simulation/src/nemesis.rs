//! The nemesis: a random timeline of faults drawn from the seed.
//!
//! Faults arrive as a Poisson process (exponential gaps of mean
//! `mean_interval`); each picks a kind, its targets and a length between
//! `min_length` and `max_length`. Nothing ends after the scenario's
//! duration: the world heals every fault then in any case.

use crate::scenario::{Delay, Dur, Event, Fleet, Nemesis, NetworkChange};

/// Draws the nemesis's timeline for a run of `duration`.
pub fn generate(
    rng: &mut fastrand::Rng,
    nemesis: &Nemesis,
    fleet: &Fleet,
    duration: Dur,
) -> Vec<Event> {
    let mut out = Vec::new();
    let mut t = 0u64;
    let mut joined = 0usize;
    loop {
        let gap = -(1.0 - rng.f64()).ln() * nemesis.mean_interval.0 as f64;
        t += gap.round().max(1.0) as u64;
        if t >= duration.0 {
            break;
        }
        let at = Dur(t);
        let length = Dur(rng.u64(nemesis.min_length.0..=nemesis.max_length.0));
        let edges = fleet.edges + joined;
        let some_edge = |rng: &mut fastrand::Rng| {
            if edges == 0 {
                "clouds".to_string()
            } else {
                format!("edge-{}", rng.usize(0..edges))
            }
        };
        let fraction = |rng: &mut fastrand::Rng| format!("fraction:{:.2}", 0.05 + rng.f64() * 0.6);
        let kinds = if nemesis.churn { 12 } else { 10 };
        let event = match rng.usize(0..kinds) {
            0 | 1 => Event::Partition {
                at,
                length,
                a: "clouds".into(),
                b: fraction(rng),
            },
            2 => Event::OneWay {
                at,
                length,
                from: if rng.bool() {
                    "clouds".into()
                } else {
                    fraction(rng)
                },
                to: if rng.bool() {
                    "clouds".into()
                } else {
                    fraction(rng)
                },
            },
            3 => {
                let down = Dur(rng.u64(500..=10_000));
                let up = Dur(rng.u64(500..=10_000));
                Event::Flap {
                    at,
                    length,
                    a: "clouds".into(),
                    b: fraction(rng),
                    down,
                    up,
                }
            }
            4 if fleet.sites > 0 => Event::IsolateSite {
                at,
                length,
                site: format!("site-{}", rng.usize(0..fleet.sites)),
            },
            4 | 5 => {
                let node = if nemesis.cloud_crashes && rng.u8(..) < 48 {
                    format!("cloud-{}", rng.usize(0..fleet.clouds.max(1)))
                } else {
                    some_edge(rng)
                };
                Event::Crash {
                    at,
                    node,
                    restart_after: Some(length),
                }
            }
            6 => Event::Partition {
                at,
                length,
                a: some_edge(rng),
                b: "all".into(),
            },
            7 => {
                let max = nemesis.max_skew.0 as i64;
                Event::Skew {
                    at,
                    node: if rng.bool() {
                        some_edge(rng)
                    } else {
                        "cloud-0".into()
                    },
                    skew_ms: rng.i64(-max..=max),
                }
            }
            8 | 9 => Event::Network {
                at,
                length,
                change: NetworkChange {
                    delay: rng.bool().then(|| Delay::Exponential {
                        min: Dur(rng.u64(1..=50)),
                        mean: Dur(rng.u64(10..=500)),
                    }),
                    loss: Some(rng.f64() * 0.2),
                    reset: Some(rng.f64() * 0.02),
                    duplicate: Some(rng.f64() * 0.3),
                    reorder: Some(rng.f64() * 0.2),
                },
            },
            10 => {
                joined += 1;
                Event::Join { at, count: 1 }
            }
            _ => Event::Leave {
                at,
                node: some_edge(rng),
            },
        };
        out.push(event);
    }
    out
}
