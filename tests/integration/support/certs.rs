//! Certificates made by the test, with the `openssl` CLI, into a temporary directory: nothing
//! private is committed, and every run proves the set-up still works with today's openssl.
//! (A few RSA keys: a second or two on a loaded machine.)

use std::path::{Path, PathBuf};
use std::process::Command;

use super::TempDir;

/// How long the certificates are valid: the length of a test run, with room.
const DAYS: &str = "2";

/// The Kafka TLS set (what `sitewatch agent` meets at a managed Kafka, and what goes wrong):
///
/// - `ca.pem` / `ca.key`: the test CA;
/// - `server.pem` / `server.key`: the broker's, CN localhost, SAN `DNS:localhost` and
///   `IP:127.0.0.1`;
/// - `wrong-host.pem` / `wrong-host.key`: a broker certificate from the same CA that names
///   `elsewhere.invalid` only (hostname verification must refuse it);
/// - `client.pem` / `client.key`: our client certificate (CN sitewatch-agent), key in PKCS#8;
///   `client-rsa.key`: the same key in PKCS#1 (`BEGIN RSA PRIVATE KEY`);
/// - `client-ec.pem` / `client-ec.key`: a client certificate with a SEC1 EC key (refused, with
///   advice);
/// - `other-ca.pem` / `other-client.pem` / `other-client.key`: an unrelated CA and a client
///   certificate it signed.
pub struct KafkaCerts {
    dir: TempDir,
}

impl KafkaCerts {
    pub fn make() -> KafkaCerts {
        let dir = TempDir::new("kafka-certs");
        let d = dir.path();
        ca(d, "ca", "sitewatch test CA");
        ca(d, "other-ca", "unrelated CA");
        sign(
            d,
            "server",
            "/CN=localhost",
            "ca",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        );
        sign(
            d,
            "wrong-host",
            "/CN=elsewhere.invalid",
            "ca",
            "subjectAltName=DNS:elsewhere.invalid",
        );
        sign(
            d,
            "client",
            "/CN=sitewatch-agent",
            "ca",
            "extendedKeyUsage=clientAuth",
        );
        sign(
            d,
            "other-client",
            "/CN=intruder",
            "other-ca",
            "extendedKeyUsage=clientAuth",
        );
        openssl(
            d,
            &[
                "rsa",
                "-in",
                "client.key",
                "-traditional",
                "-out",
                "client-rsa.key",
            ],
        );
        openssl(
            d,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "client-ec.key",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                "client-ec.key",
                "-subj",
                "/CN=sitewatch-ec",
                "-out",
                "client-ec.csr",
            ],
        );
        x509_sign(d, "client-ec", "ca", None);
        KafkaCerts { dir }
    }

    /// The file `name` of the set (see the type's list; another name is a file that is not
    /// there, for the tests of a missing file).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs `openssl ARGS` in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (the openssl CLI is needed)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA in `dir`: `NAME.pem` and `NAME.key`.
pub fn ca(dir: &Path, name: &str, cn: &str) {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            DAYS,
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &key,
            "-out",
            &pem,
        ],
    );
}

/// A new RSA key (PKCS#8) and a certificate for `subject` signed by the CA `ca` (see [`ca`]),
/// with the extension line `ext`: `NAME.pem` and `NAME.key` in `dir`.
pub fn sign(dir: &Path, name: &str, subject: &str, ca: &str, ext: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    x509_sign(dir, name, ca, Some(ext));
}

/// `NAME.csr` → `NAME.pem`, signed by `ca`; the request and the extension file are removed.
fn x509_sign(dir: &Path, name: &str, ca: &str, ext: Option<&str>) {
    let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    let ext_file = format!("{name}.ext");
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        DAYS,
        "-out",
        &pem,
    ];
    if let Some(ext) = ext {
        std::fs::write(dir.join(&ext_file), format!("{ext}\n")).expect("write extension file");
        args.extend(["-extfile", &ext_file]);
    }
    openssl(dir, &args);
    let _ = std::fs::remove_file(dir.join(&csr));
    let _ = std::fs::remove_file(dir.join(&ext_file));
}
