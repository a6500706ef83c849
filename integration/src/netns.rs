//! Real networks for tests: a Linux network namespace joined to the test's own by a veth pair,
//! with nftables rules inside it for random loss, a partition, or blocked UDP.
//!
//! Loopback loses nothing, so loss recovery, partitions and UDP-blocking firewalls can only be
//! tested across a link that can misbehave. The namespace plays a remote node: processes started
//! through [`NetNode::command`] live in it, reachable from the test at [`NetNode::ip`]. Addresses
//! come from 198.18.0.0/15 (the benchmarking range), so nothing leaves the machine. Needs root
//! (CI runs as root), `ip` (iproute2) and `nft` (nftables); everything is removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
    #[error("cannot run `{program}`: {source} (network tests need root, iproute2 and nftables)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

fn run(program: &str, args: &[&str]) -> Result<(), NetError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(NetError::Command {
        command: format!("{program} {}", args.join(" ")),
        output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// How the link between the test's namespace and the node misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing dropped.
    Clean,
    /// Each packet, either way, dropped with this probability in thousandths.
    RandomLoss { per_mille: u32 },
    /// Every packet either way dropped: the node is off the network.
    Partition,
    /// UDP dropped either way, TCP passes (a NetworkPolicy or firewall without UDP).
    UdpBlocked,
}

/// A network namespace standing for one remote node, linked to the test's namespace.
pub struct NetNode {
    name: String,
    host_ip: Ipv4Addr,
    ip: Ipv4Addr,
    veth_inside: String,
}

impl NetNode {
    /// Creates the namespace and its link (a /30 of its own from 198.18.0.0/15).
    pub fn create() -> Result<NetNode, NetError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names are limited to 15 bytes: pid (up to 7 digits) and a counter.
        let tag = format!("{:x}{}", pid % 0xfffff, n);
        let name = format!("ls-{tag}");
        let veth_outside = format!("lso{tag}");
        let veth_inside = format!("lsi{tag}");
        // A /30 per link: the process id picks a block of 64 links, the counter one of them.
        let block = (pid % 1024) * 64 + (n % 64);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block * 4;
        let host_ip = Ipv4Addr::from(base + 1);
        let ip = Ipv4Addr::from(base + 2);
        run("ip", &["netns", "add", &name])?;
        let node = NetNode {
            name,
            host_ip,
            ip,
            veth_inside,
        };
        let host_cidr = format!("{host_ip}/30");
        let inside_cidr = format!("{ip}/30");
        run(
            "ip",
            &[
                "link",
                "add",
                &veth_outside,
                "type",
                "veth",
                "peer",
                "name",
                &node.veth_inside,
                "netns",
                &node.name,
            ],
        )?;
        run("ip", &["addr", "add", &host_cidr, "dev", &veth_outside])?;
        run("ip", &["link", "set", &veth_outside, "up"])?;
        node.inside(
            "ip",
            &["addr", "add", &inside_cidr, "dev", &node.veth_inside],
        )?;
        node.inside("ip", &["link", "set", &node.veth_inside, "up"])?;
        node.inside("ip", &["link", "set", "lo", "up"])?;
        Ok(node)
    }

    /// The node's address, reachable from the test's namespace.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The test side's address on the link (what the node sees as the caller).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    fn inside(&self, program: &str, args: &[&str]) -> Result<(), NetError> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Replaces the link's fault: the rules act on the node's side of the veth, both ways, and
    /// never on its loopback (where its sidecar talks to its app).
    pub fn set_fault(&self, fault: Fault) -> Result<(), NetError> {
        // Deleting a table that does not exist fails; that is the clean state, so ignore it.
        let _ = self.inside("nft", &["delete", "table", "netdev", "chaos"]);
        let verdict = match fault {
            Fault::Clean => return Ok(()),
            Fault::RandomLoss { per_mille } => {
                format!("numgen random mod 1000 < {per_mille} drop")
            }
            Fault::Partition => "drop".to_string(),
            Fault::UdpBlocked => "meta l4proto udp drop".to_string(),
        };
        let veth = &self.veth_inside;
        // On the device itself (netdev ingress and egress), below the sockets: a dropped packet
        // vanishes as on a real link. An output-hook drop would instead fail the sender's
        // sendmsg with EPERM, telling it of every loss.
        let ruleset = format!(
            "table netdev chaos {{\n\
             chain incoming {{ type filter hook ingress device \"{veth}\" priority 0; {verdict}; }}\n\
             chain outgoing {{ type filter hook egress device \"{veth}\" priority 0; {verdict}; }}\n\
             }}\n"
        );
        let file = std::env::temp_dir().join(format!("{}-chaos.nft", self.name));
        std::fs::write(&file, ruleset).map_err(|source| NetError::Spawn {
            program: format!("write {}", file.display()),
            source,
        })?;
        let path = file.display().to_string();
        let applied = self.inside("nft", &["-f", &path]);
        let _ = std::fs::remove_file(&file);
        applied
    }
}

impl Drop for NetNode {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth end, and with it the pair and every rule.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}
