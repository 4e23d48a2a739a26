//! TLS settings for broker connections, built once from `[kafka.tls]`: the CA file (every
//! certificate in it is trusted, in addition to the system store), the client certificate and
//! key (the managed-Kafka `service.cert` / `service.key` / `ca.pem` setup), and hostname
//! verification.
//!
//! Accepted key formats (PEM): PKCS#8 (`BEGIN PRIVATE KEY`, what `openssl genpkey` and most
//! managed services emit) and PKCS#1 RSA (`BEGIN RSA PRIVATE KEY`, converted to PKCS#8 here
//! because native-tls takes only PKCS#8). Encrypted keys and SEC1 EC keys (`BEGIN EC PRIVATE
//! KEY`) are refused with the `openssl pkcs8 -topk8 -nocrypt` command that converts them.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::KafkaError;
use crate::config::KafkaTls;

/// Builds the connector. Errors name the file and never echo key material.
pub fn connector(tls: &KafkaTls) -> Result<native_tls::TlsConnector, KafkaError> {
    let mut b = native_tls::TlsConnector::builder();
    b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    if let Some(ca) = &tls.ca_file {
        let pem = read(ca)?;
        let certs = pem_blocks(&pem, "CERTIFICATE");
        if certs.is_empty() {
            return Err(KafkaError::tls_refused(format!(
                "{}: no PEM CERTIFICATE block",
                ca.display()
            )));
        }
        for der in certs {
            let cert = native_tls::Certificate::from_der(&der)
                .map_err(|e| KafkaError::tls(format!("{}: bad certificate", ca.display()), e))?;
            b.add_root_certificate(cert);
        }
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert)?;
            let key_pem = pkcs8_pem(&read(key)?, key)?;
            let id = native_tls::Identity::from_pkcs8(&cert_pem, &key_pem).map_err(|e| {
                KafkaError::tls(
                    format!(
                        "client certificate {} / key {}",
                        cert.display(),
                        key.display()
                    ),
                    e,
                )
            })?;
            b.identity(id);
        }
        (None, None) => {}
        _ => {
            return Err(KafkaError::Config(
                "kafka.tls: cert_file and key_file must be given together".into(),
            ));
        }
    }
    if !tls.verify_hostname {
        b.danger_accept_invalid_hostnames(true);
    }
    b.build()
        .map_err(|e| KafkaError::tls("TLS setup".into(), e))
}

fn read(path: &Path) -> Result<Vec<u8>, KafkaError> {
    std::fs::read(path).map_err(|e| KafkaError::tls(path.display().to_string(), e))
}

/// The DER contents of every `-----BEGIN {label}-----` block.
fn pem_blocks(pem: &[u8], label: &str) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = &text[..];
    while let Some(i) = rest.find(&begin) {
        let after = &rest[i + begin.len()..];
        let Some(j) = after.find(&end) else { break };
        let b64: String = after[..j].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = B64.decode(b64) {
            out.push(der);
        }
        rest = &after[j + end.len()..];
    }
    out
}

/// The key as PKCS#8 PEM (what native-tls accepts), converting PKCS#1 RSA.
pub fn pkcs8_pem(pem: &[u8], path: &Path) -> Result<Vec<u8>, KafkaError> {
    let text = String::from_utf8_lossy(pem);
    let convert_hint = format!(
        "convert it with: openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.pk8",
        path.display()
    );
    if let Some(der) = pem_blocks(pem, "PRIVATE KEY").into_iter().next() {
        return Ok(to_pem("PRIVATE KEY", &der));
    }
    if let Some(pkcs1) = pem_blocks(pem, "RSA PRIVATE KEY").into_iter().next() {
        if text.contains("ENCRYPTED") {
            return Err(KafkaError::tls_refused(format!(
                "{}: encrypted keys are not supported; {convert_hint}",
                path.display()
            )));
        }
        // PrivateKeyInfo { version 0, AlgorithmIdentifier { rsaEncryption, NULL }, OCTET STRING }
        let mut inner = vec![0x02, 0x01, 0x00];
        inner.extend_from_slice(&[
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
            0x00,
        ]);
        inner.push(0x04);
        der_len(&mut inner, pkcs1.len());
        inner.extend_from_slice(&pkcs1);
        let mut der = vec![0x30];
        der_len(&mut der, inner.len());
        der.extend_from_slice(&inner);
        return Ok(to_pem("PRIVATE KEY", &der));
    }
    let what = if text.contains("ENCRYPTED PRIVATE KEY") {
        "encrypted keys are not supported"
    } else if text.contains("EC PRIVATE KEY") {
        "SEC1 EC keys are not supported"
    } else {
        "no PEM private key found"
    };
    Err(KafkaError::tls_refused(format!(
        "{}: {what}; {convert_hint}",
        path.display()
    )))
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
}

fn to_pem(label: &str, der: &[u8]) -> Vec<u8> {
    let b64 = B64.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths() {
        for (len, want) in [
            (5usize, vec![5u8]),
            (127, vec![127]),
            (128, vec![0x81, 128]),
            (1190, vec![0x82, 0x04, 0xa6]),
        ] {
            let mut v = Vec::new();
            der_len(&mut v, len);
            assert_eq!(v, want, "{len}");
        }
    }

    #[test]
    fn unsupported_keys_say_how_to_convert() {
        for (pem, want) in [
            (
                "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
                "SEC1 EC keys",
            ),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "encrypted keys",
            ),
            ("garbage", "no PEM private key"),
        ] {
            let err = pkcs8_pem(pem.as_bytes(), Path::new("k.pem"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want) && err.contains("openssl pkcs8"), "{err}");
        }
    }
}
