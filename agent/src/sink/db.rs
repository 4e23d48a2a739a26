//! PostgreSQL connections for the sink and `init-db`: the `sslmode` semantics on top of
//! `postgres-native-tls`, the password from [`PostgresConfig::password`] (never logged, never in
//! an error), and the classification of errors into "retry on a new connection" and "this
//! batch's data is the problem".

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use native_tls::{Certificate, TlsConnector};
use postgres::Client;
use postgres::config::SslMode as PgSslMode;
use postgres_native_tls::MakeTlsConnector;

use super::SinkError;
use crate::config::{PostgresConfig, SslMode};

/// Bounds on every connection, so a database that vanished without a FIN (a cut cable, a
/// paused VM) turns into an error the sink retries instead of a thread blocked forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);

/// How the TLS connector must treat the server's certificate, derived from `sslmode` (and
/// whether a CA file is configured). Kept separate from the connector so the mapping is
/// testable without a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsPolicy {
    /// What the PostgreSQL client negotiates: no TLS, TLS if offered, or TLS or fail.
    pub negotiate: PgSslModeKind,
    /// Accept any certificate (encryption only, no authentication of the server).
    pub accept_invalid_certs: bool,
    /// Accept a certificate that chains to a trusted CA but names another host.
    pub accept_invalid_hostnames: bool,
    /// Trust only the configured CA file, not the system roots (libpq's `sslrootcert`).
    pub only_ca_file: bool,
}

/// `postgres::config::SslMode` is not `PartialEq`/`Debug`-friendly across versions; this mirror
/// is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgSslModeKind {
    Disable,
    Prefer,
    Require,
}

/// The libpq meaning of each `sslmode`:
/// - `disable`: plain TCP.
/// - `prefer`: TLS when the server offers it, without verifying the certificate; plain otherwise.
/// - `require`: TLS or fail, without verification — except that, as in libpq, a configured CA
///   file turns it into `verify-ca`.
/// - `verify-ca`: TLS, the chain must lead to the CA file (or the system roots), any host name.
/// - `verify-full`: as `verify-ca`, and the certificate must name the host we connect to.
pub fn tls_policy(mode: SslMode, has_ca_file: bool) -> TlsPolicy {
    let verify = |hostnames: bool| TlsPolicy {
        negotiate: PgSslModeKind::Require,
        accept_invalid_certs: false,
        accept_invalid_hostnames: !hostnames,
        only_ca_file: has_ca_file,
    };
    let encrypt_only = |negotiate| TlsPolicy {
        negotiate,
        accept_invalid_certs: true,
        accept_invalid_hostnames: true,
        only_ca_file: false,
    };
    match mode {
        SslMode::Disable => TlsPolicy {
            negotiate: PgSslModeKind::Disable,
            ..encrypt_only(PgSslModeKind::Disable)
        },
        SslMode::Prefer => encrypt_only(PgSslModeKind::Prefer),
        SslMode::Require if has_ca_file => verify(false),
        SslMode::Require => encrypt_only(PgSslModeKind::Require),
        SslMode::VerifyCa => verify(false),
        SslMode::VerifyFull => verify(true),
    }
}

/// Opens one connection with the configured URL, password and TLS policy. `application_name`
/// shows in `pg_stat_activity`, which is how operators (and the tests) find the sink's sessions.
pub fn connect(cfg: &PostgresConfig, application_name: &str) -> Result<Client, SinkError> {
    let mut pg = postgres::Config::from_str(&cfg.url).map_err(|source| SinkError::Connect {
        url: cfg.url.clone(),
        source,
    })?;
    if let Some(password) = &cfg.password {
        pg.password(password.expose());
    }
    pg.application_name(application_name)
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_user_timeout(TCP_USER_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE);
    let policy = tls_policy(cfg.sslmode, cfg.ca_file.is_some());
    pg.ssl_mode(match policy.negotiate {
        PgSslModeKind::Disable => PgSslMode::Disable,
        PgSslModeKind::Prefer => PgSslMode::Prefer,
        PgSslModeKind::Require => PgSslMode::Require,
    });
    let result = if policy.negotiate == PgSslModeKind::Disable {
        pg.connect(postgres::NoTls)
    } else {
        pg.connect(MakeTlsConnector::new(tls_connector(cfg, policy)?))
    };
    result.map_err(|source| SinkError::Connect {
        url: cfg.url.clone(),
        source,
    })
}

fn tls_connector(cfg: &PostgresConfig, policy: TlsPolicy) -> Result<TlsConnector, SinkError> {
    let mut builder = TlsConnector::builder();
    builder
        .danger_accept_invalid_certs(policy.accept_invalid_certs)
        .danger_accept_invalid_hostnames(policy.accept_invalid_hostnames);
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read(path).map_err(|source| SinkError::CaFile {
            path: path.clone(),
            source,
        })?;
        let cert = Certificate::from_pem(&pem).map_err(|source| SinkError::Tls {
            ca_file: Some(path.clone()),
            source,
        })?;
        builder.add_root_certificate(cert);
        builder.disable_built_in_roots(policy.only_ca_file);
    }
    builder.build().map_err(|source| SinkError::Tls {
        ca_file: None,
        source,
    })
}

/// The error text for logs and `SinkError`: the server's message (and detail) when it sent one,
/// the client's otherwise. Neither ever contains the password: the client never echoes it.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}): {detail}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// Unix milliseconds as the value of a `timestamptz` parameter (before 1970 too).
pub fn system_time(unix_ms: i64) -> SystemTime {
    if unix_ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(unix_ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(unix_ms.unsigned_abs())
    }
}

/// True when the error says something about the rows we sent (bad value, constraint, no
/// partition for a row) rather than about the connection or the server's state. Such a batch is
/// retried record by record so one poison record becomes a dead letter instead of a stall.
pub fn is_data_error(e: &postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return false;
    };
    // Class 22: data exception; class 23: integrity constraint violation (includes "no
    // partition of relation found for row", 23514).
    let class = &code.code()[..2];
    class == "22" || class == "23"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_maps_to_libpq_semantics() {
        use PgSslModeKind::*;
        // (mode, has CA file) → (negotiate, accept invalid certs, accept invalid hostnames,
        // trust only the CA file)
        let check = |mode: SslMode, ca: bool, expected: (PgSslModeKind, bool, bool, bool)| {
            let p = tls_policy(mode, ca);
            assert_eq!(
                (
                    p.negotiate,
                    p.accept_invalid_certs,
                    p.accept_invalid_hostnames,
                    p.only_ca_file
                ),
                expected,
                "{mode:?} with ca_file={ca}"
            );
        };
        check(SslMode::Disable, false, (Disable, true, true, false));
        check(SslMode::Prefer, false, (Prefer, true, true, false));
        check(SslMode::Prefer, true, (Prefer, true, true, false));
        check(SslMode::Require, false, (Require, true, true, false));
        check(SslMode::Require, true, (Require, false, true, true));
        check(SslMode::VerifyCa, false, (Require, false, true, false));
        check(SslMode::VerifyCa, true, (Require, false, true, true));
        check(SslMode::VerifyFull, false, (Require, false, false, false));
        check(SslMode::VerifyFull, true, (Require, false, false, true));
    }

    #[test]
    fn unreadable_ca_file_is_a_clear_error() {
        let cfg = PostgresConfig {
            url: "postgres://u@127.0.0.1:1/db".into(),
            password: Some(crate::config::Secret("hunter2".into())),
            sslmode: SslMode::VerifyFull,
            ca_file: Some("/nonexistent/ca.pem".into()),
            retention: Duration::from_secs(86_400),
            rollup_retention: Duration::from_secs(86_400),
            batch_size: 10,
        };
        let Err(err) = connect(&cfg, "test") else {
            panic!("connected without a CA file");
        };
        // The cause is kept, typed: a caller can tell "missing" from "unreadable".
        let cause = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .map(|e| e.kind());
        assert_eq!(cause, Some(std::io::ErrorKind::NotFound), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_bad_url_is_a_connect_error_that_keeps_the_postgres_error() {
        let cfg = PostgresConfig {
            url: "postgres://u@127.0.0.1:1/db?sslmode=sometimes".into(),
            password: None,
            sslmode: SslMode::Disable,
            ca_file: None,
            retention: Duration::from_secs(86_400),
            rollup_retention: Duration::from_secs(86_400),
            batch_size: 10,
        };
        let Err(err) = connect(&cfg, "test") else {
            panic!("connected with a bad URL");
        };
        assert!(matches!(err, SinkError::Connect { .. }), "{err:?}");
        let cause = std::error::Error::source(&err).expect("a cause");
        assert!(cause.is::<postgres::Error>(), "{cause:?}");
        assert!(!err.is_data_error());
        assert!(err.to_string().contains("sslmode"), "{err}");
    }
}
