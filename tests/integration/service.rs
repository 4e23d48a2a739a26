//! `sitewatch agent` as systemd sees it: sd_notify messages on a real NOTIFY_SOCKET, SIGHUP
//! reload (a broken config is refused and the old one keeps running; a good one is applied),
//! SIGTERM with STOPPING=1 and exit 0.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::TempDir;
use crate::support::broker::Broker;
use crate::support::http::{HttpServer, Reply};

fn kill(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Collects notify datagrams until `pred` holds for one of them or `timeout` passes.
fn wait_for(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> bool {
    if seen.iter().any(|m| m.lines().any(&pred)) {
        return true;
    }
    wait_for_new(sock, seen, timeout, pred)
}

/// As [`wait_for`], looking only at messages that arrive from now on.
fn wait_for_new(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(&pred);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

fn config(dir: &TempDir, broker: &str, targets: &str) -> String {
    format!(
        "[agent]\nid = \"svc\"\ninterval = \"300ms\"\ntimeout = \"2s\"\njitter = \"0%\"\nstate_dir = \"{}\"\n\
         [kafka]\nbrokers = [\"{broker}\"]\ntopic = \"svc\"\npartitions = 1\nlinger = \"10ms\"\n{targets}",
        dir.path().join("state").display()
    )
}

#[test]
fn sd_notify_reload_and_stop() {
    let broker = Broker::start();
    let site = HttpServer::start(|_, _| Reply::status(200, "ok"));
    let dir = TempDir::new("svc");
    let cfg_path = dir.path().join("agent.toml");
    let one = format!("[[target]]\nid = \"a\"\nurl = \"{}\"\n", site.url("/a"));
    std::fs::write(&cfg_path, config(&dir, &broker.addr(), &one)).unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // systemd sets WATCHDOG_PID to the service's own pid; `exec` keeps the shell's pid.
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" agent --config \"$1\""])
        .arg(crate::support::BIN)
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut seen = Vec::new();
    assert!(
        wait_for(&sock, &mut seen, Duration::from_secs(20), |m| m
            == "READY=1"),
        "{seen:?}"
    );
    assert!(
        wait_for(&sock, &mut seen, Duration::from_secs(10), |m| m
            == "WATCHDOG=1"),
        "{seen:?}"
    );
    assert!(
        wait_for(&sock, &mut seen, Duration::from_secs(15), |m| m
            .starts_with("STATUS=1 targets;")),
        "{seen:?}"
    );

    // A broken config on SIGHUP is refused; the agent keeps checking target a.
    std::fs::write(
        &cfg_path,
        config(
            &dir,
            &broker.addr(),
            "[[target]]\nid = \"b\"\nurl = \"http://127.0.0.1:1/\"\ninterval = \"5x\"\n",
        ),
    )
    .unwrap();
    kill(pid, "-HUP");
    // The reload thread says RELOADING=1, handles the file, then READY=1 again.
    assert!(
        wait_for_new(&sock, &mut seen, Duration::from_secs(15), |m| m
            == "RELOADING=1"),
        "{seen:?}"
    );
    assert!(
        wait_for_new(&sock, &mut seen, Duration::from_secs(15), |m| m
            == "READY=1"),
        "{seen:?}"
    );
    let before = site.requests().len();
    crate::support::wait_for(
        "target a checked twice after the refused reload",
        Duration::from_secs(15),
        || site.requests().len() >= before + 2,
    );

    // A good config on SIGHUP is applied: target b starts being checked.
    let two = format!(
        "{one}[[target]]\nid = \"b\"\nurl = \"{}\"\n",
        site.url("/b")
    );
    std::fs::write(&cfg_path, config(&dir, &broker.addr(), &two)).unwrap();
    kill(pid, "-HUP");
    crate::support::wait_for(
        "target b checked after the reload",
        Duration::from_secs(15),
        || site.requests().iter().any(|r| r.path == "/b"),
    );

    kill(pid, "-TERM");
    assert!(
        wait_for(&sock, &mut seen, Duration::from_secs(15), |m| m
            == "STOPPING=1"),
        "{seen:?}"
    );
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("reload refused, keeping the running config")
            && stderr.contains("target \"b\": interval \"5x\""),
        "the refused reload names the field:\n{stderr}"
    );
    assert!(
        stderr.contains("configuration reloaded: 2 targets"),
        "{stderr}"
    );
    assert!(seen.iter().any(|m| m.trim() == "RELOADING=1"), "{seen:?}");
}
