//! TURN over TLS on 443 in the lab (pending until [`super::TLS_LANDED`]):
//! turnkey's settings for it and a certificate made for the test.

use std::path::Path;
use std::process::{Command, Stdio};

use super::{repo, TURN_IP};
use crate::common::require;

/// The turnkey settings for the TCP 443 column: HTTPS, WSS and TURN over
/// TLS on 203.0.113.1:443 with a certificate made for the test.
pub fn tls_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("TURNKEY_TLS__LISTEN", format!("{TURN_IP}:443")),
        (
            "TURNKEY_TLS__CERT_FILE",
            dir.join("cert.pem").display().to_string(),
        ),
        (
            "TURNKEY_TLS__KEY_FILE",
            dir.join("key.pem").display().to_string(),
        ),
    ]
}

/// A self-signed certificate for 203.0.113.1 in `dir`, and the Chromium
/// flag that accepts it. (`--ignore-certificate-errors-spki-list` pinned
/// to its key does not cover it: Chromium 156 still refused the page with
/// ERR_CERT_AUTHORITY_INVALID. A lab browser with a throwaway profile on a
/// network of its own may ignore certificate errors.)
pub fn make_test_certificate(dir: &Path) -> String {
    require("openssl", "openssl");
    std::fs::create_dir_all(dir).expect("cert dir");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={TURN_IP}")])
        .args(["-addext", &format!("subjectAltName=IP:{TURN_IP}")])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(
        status.success(),
        "openssl could not make the test certificate"
    );
    "--ignore-certificate-errors".to_string()
}

/// Whether turnkey's config already accepts the [`tls_env`] keys (shown
/// beside "pending" so nobody forgets to flip [`super::TLS_LANDED`]).
pub fn config_accepts_tls(dir: &Path) -> bool {
    make_test_certificate(dir);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnkey"));
    cmd.arg("check-config")
        .arg(repo().join("deploy/nat-lab/turnkey.toml"));
    for (k, v) in tls_env(dir) {
        cmd.env(k, v);
    }
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}
