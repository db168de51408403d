//! The deployment kit, checked without a Docker engine or a running
//! systemd (CI has neither): every compose file under deploy/ validates
//! with `docker-compose config`; the NAT lab's compose file and netns.sh
//! describe one topology and use the same NAT and firewall scripts; the
//! systemd unit passes `systemd-analyze verify` and keeps its hardening;
//! config/vps.toml passes `turnkey check-config`. The Dockerfiles
//! themselves are built only where an engine exists.

mod common;
mod lab;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{require, test_dir};
use lab::netns::Topology;
use lab::tls::make_test_certificate;
use lab::{repo, TLS_LANDED};
use serde_json::Value;

/// Debian's python3, whose yaml module comes with docker-compose (the one
/// on PATH may be another interpreter without it).
const PYTHON: &str = "/usr/bin/python3";

/// The README's steps that fill in config/vps.toml (whose `[tls]` uses
/// ACME) and, for certbot instead, switch it to certificate files.
const ETC_CONFIG: &str = "/etc/turnkey/turnkey.toml";
const SET_HOST_AND_IP: &str =
    r#"sed -i "s/turn\.example\.com/$DOMAIN/; s/203\.0\.113\.7/$IP/" /etc/turnkey/turnkey.toml"#;
const USE_CERT_FILES: &str = r#"s/^(acme_domains = )/# \1/; s/^# (cert_file = |key_file = )/\1/"#;

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every compose file under deploy/.
fn compose_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                walk(&path, out);
            } else if name.ends_with(".yml") && name.contains("compose") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo().join("deploy"), &mut files);
    files.sort();
    files
}

/// `docker-compose config` of `file` (validated, anchors merged, paths
/// resolved) as JSON. The VPS file needs its secret from an env file, as
/// on a real host.
fn compose_config(file: &Path) -> Value {
    require("docker-compose", "docker-compose");
    let dir = test_dir("compose");
    let env_file = dir.join("turnkey.env");
    std::fs::write(
        &env_file,
        "TURNKEY_AUTH__SECRETS=not-a-real-secret-0123456789\nPUBLIC_IP=203.0.113.7\n",
    )
    .expect("write env file");
    let out = Command::new("docker-compose")
        .arg("--env-file")
        .arg(&env_file)
        .arg("-f")
        .arg(file)
        .arg("config")
        .output()
        .expect("run docker-compose");
    let yaml = ok(&format!("docker-compose config of {}", file.display()), out);
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is required (Debian's python3-yaml)"
    );
    let mut py = Command::new(PYTHON)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    py.stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("feed python3");
    let json = ok(
        "yaml to json (python3-yaml)",
        py.wait_with_output().expect("python3"),
    );
    serde_json::from_str(&json).expect("compose config as JSON")
}

#[test]
fn every_compose_file_validates() {
    let files = compose_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(repo()).unwrap_or(f).display().to_string())
        .collect();
    for want in [
        "deploy/docker-compose.yml",
        "deploy/cluster/docker-compose.yml",
        "deploy/nat-lab/docker-compose.yml",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    for file in &files {
        let config = compose_config(file);
        assert!(
            config["services"]
                .as_object()
                .is_some_and(|s| !s.is_empty()),
            "{}: no services",
            file.display()
        );
    }
}

#[test]
fn the_vps_compose_file_runs_turnkey_on_the_host_network() {
    let c = compose_config(&repo().join("deploy/docker-compose.yml"));
    let tk = &c["services"]["turnkey"];
    assert_eq!(
        tk["network_mode"], "host",
        "the relay port range needs host networking"
    );
    assert_eq!(tk["build"]["dockerfile"], "deploy/Dockerfile");
    assert_eq!(
        tk["environment"]["TURNKEY_AUTH__SECRETS"], "not-a-real-secret-0123456789",
        "the secret comes from the env file"
    );
    // Without the env file the secret is missing and compose says so.
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(repo().join("deploy/docker-compose.yml"))
        .arg("config")
        .env_remove("TURNKEY_AUTH__SECRETS")
        .output()
        .expect("run docker-compose");
    assert!(!out.status.success(), "compose started without a secret");
    assert!(String::from_utf8_lossy(&out.stderr).contains("TURNKEY_AUTH__SECRETS"));
}

/// The compose lab rebuilt in netns.sh's terms: networks and subnets,
/// nodes and addresses, each router's NAT mode, each client's gateway.
fn topology_of_compose(c: &Value) -> Topology {
    let mut topo = Topology::default();
    for (name, net) in c["networks"].as_object().expect("networks") {
        assert_eq!(net["internal"], true, "network {name} must be internal");
        let subnet = net["ipam"]["config"][0]["subnet"].as_str().expect("subnet");
        topo.nets.insert(name.clone(), subnet.to_string());
    }
    for (name, svc) in c["services"].as_object().expect("services") {
        let mut node = BTreeMap::new();
        for (net, cfg) in svc["networks"].as_object().expect("networks of a service") {
            let addr = cfg["ipv4_address"].as_str().expect("a fixed address");
            node.insert(net.clone(), addr.to_string());
        }
        let command: Vec<&str> = svc["command"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match command.as_slice() {
            ["router", mode, lan] => {
                node.insert("nat".into(), mode.to_string());
                // router.sh masquerades the LAN it is given: it must be the
                // subnet of the router's own LAN network.
                let own_lan = node
                    .keys()
                    .filter(|n| *n != "public" && *n != "nat")
                    .map(|n| topo.nets[n].as_str())
                    .next();
                assert_eq!(own_lan, Some(*lan), "{name}: router.sh given another LAN");
            }
            ["client", _room] => {
                if let Some(gw) = svc["environment"]["GATEWAY"].as_str() {
                    node.insert("gw".into(), gw.to_string());
                }
            }
            _ => {}
        }
        topo.nodes.insert(name.clone(), node);
    }
    topo
}

#[test]
fn the_compose_lab_and_the_netns_lab_are_one_topology() {
    let c = compose_config(&repo().join("deploy/nat-lab/docker-compose.yml"));
    let compose = topology_of_compose(&c);
    let netns = Topology::load();
    assert_eq!(
        compose.nets, netns.nets,
        "networks differ (compose, then netns.sh)"
    );
    for name in compose.nodes.keys().chain(netns.nodes.keys()) {
        assert_eq!(
            compose.nodes.get(name),
            netns.nodes.get(name),
            "node {name} differs (compose, then netns.sh)"
        );
    }

    // Same rules: both labs run the same scripts with the same arguments.
    let netns_sh = std::fs::read_to_string(repo().join("deploy/nat-lab/netns.sh")).unwrap();
    assert!(netns_sh.contains(r#"sh "$here/router.sh" "$val" "$(subnet_of "$lan")""#));
    assert!(netns_sh.contains(r#"sh "$here/firewall.sh" "$4" "$TURN_IP""#));
    let entry = std::fs::read_to_string(repo().join("deploy/nat-lab/lab.sh")).unwrap();
    assert!(entry.contains(r#"sh /lab/router.sh "$@""#));
    assert!(entry.contains(r#"sh /lab/firewall.sh "${FIREWALL:-open}" "$TURN_IP""#));
    let image = std::fs::read_to_string(repo().join("deploy/nat-lab/Dockerfile")).unwrap();
    assert!(image.contains("COPY deploy/nat-lab/router.sh deploy/nat-lab/firewall.sh"));
    assert!(image.contains("COPY tests/lab/client.mjs"));
    // And the same turnkey config.
    let volumes = c["services"]["turnkey"]["volumes"].to_string();
    assert!(
        volumes.contains("deploy/nat-lab/turnkey.toml"),
        "compose turnkey must mount deploy/nat-lab/turnkey.toml: {volumes}"
    );
}

#[test]
fn the_dockerfile_builds_one_binary_for_a_non_root_user() {
    let d = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let stages = d.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(stages, 2, "a build stage and a runtime stage");
    assert!(d.contains("cargo build --release --locked --bin turnkey"));
    assert!(d.contains("USER nonroot:nonroot"));
    assert!(d.contains(r#"ENTRYPOINT ["/usr/local/bin/turnkey"]"#));
    assert!(
        repo().join("deploy/Dockerfile.dockerignore").exists(),
        "the build context must leave target/ out"
    );
}

/// `systemd-analyze verify` wants ExecStart's binary to exist, so it
/// checks a copy whose ExecStart is the binary under test; everything
/// else is the file as shipped. It exits 0 even for unknown keys and bad
/// values (it only warns), so any output fails too.
#[test]
fn the_systemd_unit_verifies_and_keeps_its_hardening() {
    require("systemd-analyze", "systemd");
    let unit = std::fs::read_to_string(repo().join("deploy/turnkey.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/turnkey --config /etc/turnkey/turnkey.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "turnkey.service lacks `{line}`"
        );
    }
    let dir = test_dir("systemd");
    let copy = dir.join("turnkey.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/turnkey", env!("CARGO_BIN_EXE_turnkey")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let said = common::printed(&out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    // The check is real: a misspelt key is reported.
    std::fs::write(
        &copy,
        std::fs::read_to_string(&copy)
            .unwrap()
            .replace("ProtectSystem=", "ProtectSystm="),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectSystm"));
}

/// The cluster example: Redis, two nodes on one shared config (backend
/// redis) with their own TURN ports and relay ranges, HAProxy in front
/// checking `/readyz`. The same topology runs as processes in
/// tests/cluster.rs.
#[test]
fn the_cluster_compose_file_runs_two_nodes_on_redis_behind_haproxy() {
    let c = compose_config(&repo().join("deploy/cluster/docker-compose.yml"));
    let services = c["services"].as_object().expect("services");
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["balancer", "redis", "turnkey-a", "turnkey-b"]);
    let mut relay_ranges = Vec::new();
    for node in ["turnkey-a", "turnkey-b"] {
        let s = &services[node];
        let env = &s["environment"];
        assert_eq!(env["TURNKEY_TURN__EXTERNAL_IP"], "203.0.113.7", "{node}");
        relay_ranges.push(env["TURNKEY_TURN__RELAY_PORT_MIN"].clone());
        let mounts = s["volumes"].to_string();
        assert!(
            mounts.contains("/etc/turnkey/turnkey.toml"),
            "{node}: {mounts}"
        );
    }
    assert_ne!(
        relay_ranges[0], relay_ranges[1],
        "one host, two relay ranges"
    );
    let cluster = repo().join("deploy/cluster");
    let shown = ok(
        "turnkey check-config deploy/cluster/turnkey.toml",
        check_config(&cluster.join("turnkey.toml")),
    );
    assert!(shown.contains("backend = \"redis\""), "{shown}");
    assert!(shown.contains("redis://redis:6379/"), "{shown}");
    let haproxy = std::fs::read_to_string(cluster.join("haproxy.cfg")).expect("haproxy.cfg");
    for want in [
        "server a turnkey-a:8080",
        "server b turnkey-b:8080",
        "GET /readyz",
    ] {
        assert!(haproxy.contains(want), "haproxy.cfg lacks {want}");
    }
}

fn check_config(file: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnkey"));
    cmd.arg("check-config").arg(file);
    for (key, _) in std::env::vars() {
        if key.starts_with("TURNKEY_") {
            cmd.env_remove(key);
        }
    }
    cmd.output().expect("run turnkey check-config")
}

#[test]
fn the_vps_config_passes_check_config() {
    let vps = repo().join("config/vps.toml");
    let shown = ok("turnkey check-config config/vps.toml", check_config(&vps));
    for want in [
        "public_host = \"turn.example.com\"",
        "external_ip = \"203.0.113.7\"",
    ] {
        assert!(
            shown.contains(want),
            "effective config lacks {want}:\n{shown}"
        );
    }

    // The README's steps on a copy, by its own commands: the host name and
    // IP put in (step 3), which makes ACME ask for that name; then the
    // certbot alternative of step 5, with a certificate where its deploy
    // hook puts it.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for step in [
        SET_HOST_AND_IP,
        &format!("sed -i -E '{USE_CERT_FILES}' {ETC_CONFIG}"),
    ] {
        assert!(
            readme.contains(step),
            "README.md (Deploy on a VPS) lacks `{step}`"
        );
    }
    let dir = test_dir("vps");
    let copy = dir.join("turnkey.toml");
    std::fs::copy(&vps, &copy).unwrap();
    let step3 = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "DOMAIN=turn.lab.test IP=198.51.100.7; {}",
            SET_HOST_AND_IP.replace(ETC_CONFIG, "\"$1\"")
        ))
        .arg("sh")
        .arg(&copy)
        .output()
        .expect("run sh");
    ok("the README's step 3", step3);
    let shown = ok("check-config after step 3", check_config(&copy));
    for want in [
        "public_host = \"turn.lab.test\"",
        "external_ip = \"198.51.100.7\"",
        "acme_domains = [\"turn.lab.test\"]",
    ] {
        assert!(
            shown.contains(want),
            "after step 3 the config lacks {want}:\n{shown}"
        );
    }

    make_test_certificate(&dir);
    let step5 = Command::new("sed")
        .args(["-i", "-E", USE_CERT_FILES])
        .arg(&copy)
        .output()
        .expect("run sed");
    ok("the README's step 5", step5);
    let text = std::fs::read_to_string(&copy).unwrap();
    assert!(
        text.contains("\n[tls]\n")
            && text.contains("\n# acme_domains = ")
            && text.contains("\ncert_file = "),
        "the README's sed did not switch [tls] to certificate files"
    );
    let text = text
        .replace(
            "/etc/turnkey/tls/fullchain.pem",
            &dir.join("cert.pem").display().to_string(),
        )
        .replace(
            "/etc/turnkey/tls/privkey.pem",
            &dir.join("key.pem").display().to_string(),
        );
    std::fs::write(&copy, text).unwrap();
    let out = check_config(&copy);
    if TLS_LANDED {
        ok("check-config after step 5 ([tls] on)", out);
    } else {
        eprintln!(
            "deploy: config/vps.toml with [tls] on: pending until TURN over TLS lands \
             (today's check-config says: {})",
            if out.status.success() {
                "valid"
            } else {
                "invalid"
            }
        );
    }
}
