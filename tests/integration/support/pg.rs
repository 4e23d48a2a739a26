//! PostgreSQL for tests: a database per test on a real server, dropped afterwards.
//!
//! The server is, by `SITEWATCH_TEST_PG`:
//! - unset: the server at 127.0.0.1:5432 (user `postgres`, trust auth) when one answers, else a
//!   throwaway cluster;
//! - `throwaway`: always a throwaway cluster (`initdb` + `pg_ctl` from
//!   `/usr/lib/postgresql/<version>/bin` or `SITEWATCH_PG_BIN`, on a temp dir and a free port),
//!   shared by the tests running at the same time and removed when the last one ends;
//! - `postgres://user@host:port`: that server (its user must be allowed to create databases).
//!
//! Tests that stop/restart the server or need TLS start a [`Cluster`] of their own.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sitewatch::config::{PostgresConfig, SslMode};

use super::free_port;

/// A server the tests can create databases on.
pub struct Server {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Present when the harness started the server; stopping it is the cluster's Drop.
    pub cluster: Option<Cluster>,
}

impl Server {
    /// The shared server for ordinary tests (see the module doc for the choice).
    pub fn shared() -> Arc<Server> {
        static SHARED: Mutex<Weak<Server>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(Server::choose());
        *slot = Arc::downgrade(&server);
        server
    }

    fn choose() -> Server {
        let choice = std::env::var("SITEWATCH_TEST_PG").unwrap_or_default();
        if choice == "throwaway" {
            return Server::throwaway(ClusterOptions::default());
        }
        if let Some(rest) = choice
            .strip_prefix("postgres://")
            .or(choice.strip_prefix("postgresql://"))
        {
            let (user, hostport) = rest
                .trim_end_matches('/')
                .split_once('@')
                .expect("SITEWATCH_TEST_PG=postgres://user@host:port");
            let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
            return Server {
                host: host.to_string(),
                port: port.parse().expect("port in SITEWATCH_TEST_PG"),
                user: user.to_string(),
                cluster: None,
            };
        }
        let local = Server {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            cluster: None,
        };
        if local.answers() {
            local
        } else {
            Server::throwaway(ClusterOptions::default())
        }
    }

    /// A fresh cluster owned by the returned server.
    pub fn throwaway(options: ClusterOptions) -> Server {
        let cluster = Cluster::start(options);
        Server {
            host: "127.0.0.1".into(),
            port: cluster.port,
            user: "postgres".into(),
            cluster: Some(cluster),
        }
    }

    fn answers(&self) -> bool {
        let addr = format!("{}:{}", self.host, self.port);
        let Ok(sock) = addr.parse() else { return false };
        TcpStream::connect_timeout(&sock, Duration::from_secs(2)).is_ok()
            && postgres::Client::connect(&self.admin_url(), postgres::NoTls).is_ok()
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}@{}:{}/{db}?sslmode=disable",
            self.user, self.host, self.port
        )
    }

    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    pub fn admin(&self) -> postgres::Client {
        connect_retrying(&self.admin_url(), Duration::from_secs(60))
    }

    pub fn is_throwaway(&self) -> bool {
        self.cluster.is_some()
    }
}

/// Connects, retrying while the server starts up.
pub fn connect_retrying(url: &str, within: Duration) -> postgres::Client {
    let end = Instant::now() + within;
    loop {
        match postgres::Client::connect(url, postgres::NoTls) {
            Ok(c) => return c,
            Err(e) if Instant::now() < end => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

/// One database for one test, dropped (with its connections) when this is dropped.
pub struct TestDb {
    pub name: String,
    pub server: Arc<Server>,
}

impl TestDb {
    /// A new database on the shared server.
    pub fn create() -> TestDb {
        TestDb::create_on(Server::shared())
    }

    pub fn create_on(server: Arc<Server>) -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sitewatch_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            sitewatch::util::unix_ms_now() % 1_000_000
        );
        server
            .admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDb { name, server }
    }

    pub fn url(&self) -> String {
        self.server.url(&self.name)
    }

    pub fn client(&self) -> postgres::Client {
        connect_retrying(&self.url(), Duration::from_secs(60))
    }

    /// The sink's view of this database: no TLS, a week of retention.
    pub fn pg_config(&self) -> PostgresConfig {
        PostgresConfig {
            url: self.url(),
            password: None,
            sslmode: SslMode::Disable,
            ca_file: None,
            retention: Duration::from_secs(7 * 86_400),
            rollup_retention: Duration::from_secs(400 * 86_400),
            batch_size: 1000,
        }
    }

    /// Kills every session of this database whose application_name starts with `prefix`;
    /// returns how many.
    pub fn terminate_sessions(&self, prefix: &str) -> i64 {
        let mut admin = self.server.admin();
        let like = format!("{prefix}%");
        admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name LIKE $2 AND pid <> pg_backend_pid()",
                &[&self.name, &like],
            )
            .map(|r| r.get(0))
            .unwrap_or(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let stopped = self.server.cluster.as_ref().is_some_and(|c| !c.running());
        if stopped {
            return;
        }
        if let Ok(mut admin) = postgres::Client::connect(&self.server.admin_url(), postgres::NoTls)
        {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

#[derive(Default, Clone)]
pub struct ClusterOptions {
    /// (certificate PEM file, key PEM file): start with `ssl = on` and only `hostssl` allowed
    /// over TCP.
    pub ssl: Option<(PathBuf, PathBuf)>,
}

/// A PostgreSQL cluster in a temp dir, started with `pg_ctl`, stopped and removed on Drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// `postgres` when the tests run as root (initdb refuses root).
    run_as: Option<String>,
}

impl Cluster {
    pub fn start(options: ClusterOptions) -> Cluster {
        let bin = pg_bin();
        let run_as = running_as_root().then(|| "postgres".to_string());
        let dir = std::env::temp_dir().join(format!(
            "sitewatch-pg-{}-{}",
            std::process::id(),
            sitewatch::util::new_check_id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        if let Some(user) = &run_as {
            let ok = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown {user} {}", dir.display());
        }
        let data = dir.join("data");
        let cluster = Cluster {
            dir: dir.clone(),
            port: free_port(),
            bin,
            run_as,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let mut conf = String::from(
            "fsync = off\nfull_page_writes = off\nmax_connections = 100\n\
             listen_addresses = '127.0.0.1'\n",
        );
        conf.push_str(&format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            cluster.port,
            dir.display()
        ));
        if let Some((cert, key)) = &options.ssl {
            let copy = |from: &Path, name: &str| {
                let to = dir.join(name);
                std::fs::copy(from, &to).expect("copy TLS file");
                to
            };
            let cert = copy(cert, "server.crt");
            let key = copy(key, "server.key");
            cluster.chown(&cert);
            cluster.chown(&key);
            set_mode(&key, 0o600);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                cert.display(),
                key.display()
            ));
            // TCP only over TLS, so a client that does not negotiate TLS is refused; the role
            // `sitewatch` (if a test creates it) must give its password.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all sitewatch 127.0.0.1/32 scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("write pg_hba.conf");
        }
        let auto = data.join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&auto).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&auto, existing).expect("write postgresql.auto.conf");
        cluster.start_server();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn chown(&self, path: &Path) {
        if let Some(user) = &self.run_as {
            let _ = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(path)
                .status();
        }
    }

    /// Runs a PostgreSQL tool (as `postgres` when we are root); panics with its output on
    /// failure.
    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data()),
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
    }

    /// Stops the server: `fast` (clean) or `immediate` (like a crash).
    pub fn stop_server(&self, mode: &str) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data()),
                "-m",
                mode,
                "-w",
                "-t",
                "120",
                "stop",
            ],
        );
    }

    pub fn running(&self) -> bool {
        self.data().join("postmaster.pid").exists()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.stop_server("immediate")
            }));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The directory with `initdb` and `pg_ctl`: `SITEWATCH_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("SITEWATCH_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (or SITEWATCH_PG_BIN)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("initdb under /usr/lib/postgresql/*/bin")
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
