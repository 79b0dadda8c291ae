//! Network namespaces for the real-process mode: one namespace per node,
//! joined through a bridge in a hub namespace, and nftables rules in each
//! node's namespace for partitions and loss.
//!
//! ```text
//!   <id>-cloud-0        <id>-edge-0        <id>-edge-1 ...
//!        eth0 10.213.0.2    eth0 10.213.0.3    eth0 10.213.0.4
//!          \                  |                  /
//!           +------- br0 in <id>-hub ----------+
//! ```
//!
//! Nothing is created in the host's own namespace: every interface, address
//! and rule lives in a namespace this module created, so a run never sends
//! a packet to any other address. The kernel of this project's machines has
//! no `netem`, so delay and reordering are not available here; partitions
//! (both ways or one way) and random loss (`numgen random`) are nftables
//! rules. Each node's rules are replaced in one nftables transaction.
//!
//! A run's id starts with `osim` and the harness's process id. [`Net`] deletes its
//! namespaces when dropped, and [`sweep_stale`] deletes those of harness
//! processes that no longer exist (a run killed before it could clean up).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use tracing::{debug, warn};

/// The prefix of every namespace the harness creates.
pub const PREFIX: &str = "osim";

/// Why the network could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command could not be started (the tool is missing).
    #[error(
        "cannot run {cmd}: {source} (the real-process mode needs `ip` (iproute2) and `nft` (nftables), and root)"
    )]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{cmd} failed: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// What it printed on standard error.
        stderr: String,
    },
    /// Too many nodes for the address plan.
    #[error("at most 200 nodes fit the address plan, not {0}")]
    TooMany(usize),
}

/// Runs `program args`, feeding `input` on standard input.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, NetError> {
    let cmd = format!("{program} {}", args.join(" "));
    debug!(%cmd, "netns");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| NetError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `name` (a namespace, a Node, a run id) belongs to a run of a
/// harness process that no longer exists: it starts with [`PREFIX`] and the
/// process id of a dead process.
pub fn owner_is_gone(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(pid) = digits.parse::<u32>() else {
        return false;
    };
    pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes the namespaces of harness runs whose process is gone.
pub fn sweep_stale() -> Result<usize, NetError> {
    let list = run("ip", &["netns", "list"], None)?;
    let mut gone = 0;
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if owner_is_gone(name) {
            match run("ip", &["netns", "del", name], None) {
                Ok(_) => gone += 1,
                Err(e) => warn!(%name, "cannot delete a stale namespace: {e}"),
            }
        }
    }
    Ok(gone)
}

/// One node's place in the network.
#[derive(Debug, Clone)]
pub struct NetNode {
    /// The node's name (`cloud-0`, `edge-1`...).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
}

/// What the network does at one moment: the directions that are cut, and
/// the loss on every link.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conditions {
    /// Cut directions: (from, to) by node name.
    pub cut: BTreeSet<(String, String)>,
    /// Probability that a packet is lost, on every link.
    pub loss: f64,
}

/// The namespaces of one run. Dropping it deletes them.
#[derive(Debug)]
pub struct Net {
    hub: String,
    nodes: BTreeMap<String, NetNode>,
    created: Vec<String>,
}

impl Net {
    /// Creates the hub and one namespace per node, with addresses in
    /// 10.213.0.0/24: the `i`th name gets 10.213.0.(i + 2).
    ///
    /// `id` names the run: it starts with [`PREFIX`] and the harness's
    /// process id (`osim1234r0`), and every namespace is `<id>-<name>`.
    pub fn create(id: &str, names: &[String]) -> Result<Net, NetError> {
        if names.len() > 200 {
            return Err(NetError::TooMany(names.len()));
        }
        let mut net = Net {
            hub: format!("{id}-hub"),
            nodes: BTreeMap::new(),
            created: Vec::new(),
        };
        let hub = net.hub.clone();
        net.add_ns(&hub)?;
        run(
            "ip",
            &["-n", &hub, "link", "add", "br0", "type", "bridge"],
            None,
        )?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"], None)?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{id}-{name}");
            net.add_ns(&ns)?;
            let port = format!("p{i}");
            // Both ends are made where they live: nothing appears in the
            // host's namespace, even for a moment.
            run(
                "ip",
                &[
                    "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
                None,
            )?;
            run(
                "ip",
                &["-n", &hub, "link", "set", &port, "master", "br0", "up"],
                None,
            )?;
            let ip = Ipv4Addr::new(10, 213, 0, (i + 2) as u8);
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
                None,
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"], None)?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"], None)?;
            net.nodes.insert(
                name.clone(),
                NetNode {
                    name: name.clone(),
                    ns,
                    ip,
                },
            );
        }
        // Every node starts with an (empty) rule table, so that a later
        // change is always a replacement.
        net.apply(&Conditions::default())?;
        Ok(net)
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), NetError> {
        run("ip", &["netns", "add", ns], None)?;
        self.created.push(ns.to_owned());
        Ok(())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NetNode> {
        self.nodes.get(name)
    }

    /// A command that runs `program` inside `node`'s namespace.
    pub fn command(&self, node: &NetNode, program: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &node.ns]).arg(program);
        cmd
    }

    /// Replaces every node's rules so that the network behaves as `c` says.
    pub fn apply(&self, c: &Conditions) -> Result<(), NetError> {
        for node in self.nodes.values() {
            let ips = |pick: &dyn Fn(&(String, String)) -> Option<String>| -> Vec<Ipv4Addr> {
                c.cut
                    .iter()
                    .filter_map(pick)
                    .filter_map(|n| self.nodes.get(&n).map(|n| n.ip))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            };
            let deaf_to = ips(&|(from, to)| (to == &node.name).then(|| from.clone()));
            let mute_to = ips(&|(from, to)| (from == &node.name).then(|| to.clone()));
            let set = |v: &[Ipv4Addr]| {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut input = String::new();
            let mut output = String::new();
            if !deaf_to.is_empty() {
                input.push_str(&format!("    ip saddr {{ {} }} drop\n", set(&deaf_to)));
            }
            if !mute_to.is_empty() {
                output.push_str(&format!("    ip daddr {{ {} }} drop\n", set(&mute_to)));
            }
            // Each node drops incoming packets from the bridge with the
            // loss probability: every direction of every link loses that share.
            let per_million = (c.loss.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
            if per_million > 0 {
                input.push_str(&format!(
                    "    iifname \"eth0\" numgen random mod 1000000 < {per_million} drop\n"
                ));
            }
            let script = format!(
                "table inet outpost_sim\ndelete table inet outpost_sim\n\
                 table inet outpost_sim {{\n\
                 \x20 chain input {{\n    type filter hook input priority 0; policy accept;\n{input}  }}\n\
                 \x20 chain output {{\n    type filter hook output priority 0; policy accept;\n{output}  }}\n}}\n"
            );
            run(
                "ip",
                &["netns", "exec", &node.ns, "nft", "-f", "-"],
                Some(&script),
            )?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns], None) {
                warn!(%ns, "cannot delete the namespace: {e}");
            }
        }
    }
}
