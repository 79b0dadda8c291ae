//! The workload that the deterministic mode ([`crate::world`]) and the
//! real-stack mode ([`crate::quic`]) both run: the cloud's provisioning
//! writes, an edge's report tick and the Kubernetes API's writes at a cloud.
//!
//! Each function draws from the mode's random generator and makes its
//! writes through [`Writes`], interleaved in one fixed order, so that both
//! modes make the same draws in the same order for a seed. The modes differ
//! only in how they make a write (a replica in simulated time, or a real
//! engine) and in when they call these.

use outpost_sync::document::DocId;
use serde_json::{Value, json};

use crate::scenario::{Fleet, Workload};
use crate::world::{
    device_desired, device_reported, node_status, pod_spec, pod_status, site_config, site_desired,
};

/// How a mode makes the workload's writes at a node, and the random
/// generator the workload draws from.
pub(crate) trait Writes {
    /// The generator every workload draw comes from.
    fn draws(&mut self) -> &mut fastrand::Rng;
    /// Writes whole documents at node `n`.
    fn put_docs(&mut self, n: usize, docs: Vec<(DocId, Value)>);
    /// Sets a desired value of `property` in `d` at node `n`.
    fn put_desired(&mut self, n: usize, d: &DocId, property: &str, value: String);
    /// Deletes `d` at node `n`.
    fn remove_doc(&mut self, n: usize, d: &DocId);
}

/// The cloud `cloud`'s provisioning writes for site `s`: its shared
/// ConfigMap and its line's speed.
pub(crate) fn provision_site<W: Writes>(w: &mut W, cloud: usize, s: usize) {
    w.put_docs(
        cloud,
        vec![(
            site_config(s),
            json!({"data": {"mode": "normal", "version": 0}}),
        )],
    );
    w.put_desired(cloud, &site_desired(s), "speed", "100".into());
}

/// The cloud `cloud`'s provisioning writes for the edge named `edge`: its
/// pod specs and its devices' setpoints.
pub(crate) fn provision_edge<W: Writes>(w: &mut W, cloud: usize, edge: &str, fleet: &Fleet) {
    let specs = (0..fleet.pods_per_edge)
        .map(|k| {
            (
                pod_spec(edge, k),
                json!({"containers": [{"name": "app", "image": "registry.local/app:v0"}], "restartPolicy": "Always", "nodeName": edge}),
            )
        })
        .collect();
    w.put_docs(cloud, specs);
    for d in 0..fleet.devices_per_edge {
        w.put_desired(cloud, &device_desired(edge, d), "setpoint", "20".into());
    }
}

/// One report tick of the edge `n` named `edge` (in site `site`, if any),
/// its `seq`th, at its wall time `wall` (ms): its node status, its devices'
/// reported twins, now and then a pod status, a device's setpoint and its
/// site's speed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn report_tick<W: Writes>(
    w: &mut W,
    n: usize,
    edge: &str,
    seq: u64,
    wall: u64,
    site: Option<usize>,
    fleet: &Fleet,
    workload: &Workload,
) {
    let mut docs = vec![(
        node_status(edge),
        json!({"heartbeat_ms": wall, "ready": true, "seq": seq}),
    )];
    for d in 0..fleet.devices_per_edge {
        let temp = 200 + w.draws().i64(-50..50);
        docs.push((
            device_reported(edge, d),
            json!({"twins": {"temperature": temp}, "state": "online", "seq": seq}),
        ));
    }
    if fleet.pods_per_edge > 0 && w.draws().f64() < workload.pod_status_prob {
        let k = w.draws().usize(0..fleet.pods_per_edge);
        docs.push((
            pod_status(edge, k),
            json!({"phase": "Running", "restarts": seq % 7, "seq": seq}),
        ));
    }
    w.put_docs(n, docs);
    if fleet.devices_per_edge > 0 && w.draws().f64() < workload.edge_desired_prob {
        let d = w.draws().usize(0..fleet.devices_per_edge);
        w.put_desired(
            n,
            &device_desired(edge, d),
            "setpoint",
            format!("{edge}-{seq}"),
        );
    }
    if let Some(s) = site
        && w.draws().f64() < workload.site_desired_prob
    {
        w.put_desired(n, &site_desired(s), "speed", format!("{edge}-{seq}"));
    }
}

/// One write of the Kubernetes API at the cloud `c` named `cloud`, its
/// `seq`th, about the edge named `edge` (in site `site`, if any): a desired
/// value, a pod spec (or, with `one_cloud`, now and then its deletion) or
/// the site's ConfigMap.
#[allow(clippy::too_many_arguments)]
pub(crate) fn api_write<W: Writes>(
    w: &mut W,
    c: usize,
    cloud: &str,
    seq: u64,
    edge: &str,
    site: Option<usize>,
    fleet: &Fleet,
    workload: &Workload,
    one_cloud: bool,
) {
    let roll = w.draws().f64();
    if roll < workload.api_desired_share && fleet.devices_per_edge > 0 {
        if let (Some(s), true) = (site, w.draws().u8(..) < 32) {
            w.put_desired(c, &site_desired(s), "speed", format!("{cloud}-{seq}"));
        } else {
            let d = w.draws().usize(0..fleet.devices_per_edge);
            w.put_desired(
                c,
                &device_desired(edge, d),
                "setpoint",
                format!("{cloud}-{seq}"),
            );
        }
    } else if fleet.pods_per_edge > 0 {
        let k = w.draws().usize(0..fleet.pods_per_edge);
        // Now and then the API deletes the pod instead. Only with one
        // cloud: a delete supersedes changes made concurrently to the
        // old generation, so two clouds writing one pod spec would lose
        // writes by design (pod specs have one writer in production: the
        // bridge that holds the lease).
        if one_cloud && w.draws().u8(..) < 24 {
            w.remove_doc(c, &pod_spec(edge, k));
        } else {
            let spec = json!({"containers": [{"name": "app", "image": format!("registry.local/app:v{seq}")}], "restartPolicy": "Always", "nodeName": edge, "by": cloud});
            w.put_docs(c, vec![(pod_spec(edge, k), spec)]);
        }
    } else if let Some(s) = site {
        w.put_docs(
            c,
            vec![(
                site_config(s),
                json!({"data": {"mode": "normal", "version": seq}}),
            )],
        );
    }
}
