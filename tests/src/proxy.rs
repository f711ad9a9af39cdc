//! A real HTTP CONNECT proxy for the tests: tinyproxy (Debian package `tinyproxy`) on an
//! ephemeral loopback port, with optional basic authentication and allowed CONNECT ports.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// How the proxy behaves.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Require `Proxy-Authorization: Basic` with this user and password (else 407).
    pub login: Option<(String, String)>,
    /// Allow CONNECT only to these ports (else 403); empty allows every port.
    pub connect_ports: Vec<u16>,
}

/// A running tinyproxy, killed on drop.
pub struct Tinyproxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Tinyproxy {
    /// Starts one and waits until it accepts connections (at most 10 s).
    pub fn start(opts: ProxyOptions) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 100\nAllow 127.0.0.1\n\
             LogLevel Info\nLogFile \"{}\"\n",
            dir.path().join("tinyproxy.log").display()
        );
        if let Some((user, password)) = &opts.login {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        for p in &opts.connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, conf).unwrap();
        let child = spawn(&path);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Tinyproxy {
            port,
            dir,
            child: Some(child),
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }
}

fn spawn(conf: &Path) -> Child {
    Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tinyproxy is installed (Debian package tinyproxy; scripts/test installs it)")
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
