//! The real `redis-server`, TLS only, configured like an Azure cache.
//!
//! * TLS on a free loopback port (plain `port 0`), certificate from the [`TestPki`], no client
//!   certificates, no persistence, everything in a temporary directory.
//! * ACL: the `default` user's password is the access key, so `AUTH <key>` works like on Azure;
//!   an `admin` user is for the test itself and for the fake Azure front (which creates one
//!   user per Entra token, see `azure_front`).
//!
//! The binary is `$REDIS_SERVER` if set, else `redis-server` from `PATH`, else
//! `/usr/bin/redis-server` (Debian: `apt-get install -y redis-server`).

use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tempfile::TempDir;

use super::{TestPki, random_hex};

/// How long [`RedisServer::start`] waits for the server to accept TLS connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// One `CLIENT LIST` entry of the real server.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// `id=`
    pub id: u64,
    /// `addr=` (the peer: the proxy's or the front's side of the connection)
    pub addr: String,
    /// `name=` (`CLIENT SETNAME` / `HELLO … SETNAME`)
    pub name: String,
    /// `user=`: the ACL user the connection is authenticated as (`default` when it isn't)
    pub user: String,
    /// `db=`
    pub db: u32,
    /// `cmd=`: the last command run
    pub cmd: String,
    /// `flags=`
    pub flags: String,
    /// `resp=` (2 or 3)
    pub resp: u32,
    /// Every `key=value` field of the line.
    pub fields: HashMap<String, String>,
}

/// A running `redis-server`; killed and its directory deleted on drop.
pub struct RedisServer {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    ca_pem: String,
    admin_password: String,
    access_keys: Mutex<Vec<String>>,
}

/// The `redis-server` to run: `$REDIS_SERVER`, else the first on `PATH`, else
/// `/usr/bin/redis-server` (also used by the cluster harness).
pub fn redis_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("redis-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("/usr/bin/redis-server")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers over TLS. Panics (with the server log)
    /// if it doesn't within a bounded time.
    pub async fn start(pki: &TestPki) -> RedisServer {
        super::install_crypto_provider();
        let mut dir = tempfile::Builder::new()
            .prefix("test-redis-")
            .tempdir()
            .expect("create temp dir for redis-server");
        // Distinctive random secrets, so tests can check they never show up in the proxy's logs.
        let access_key = format!("AccessKey1x{}", random_hex(24));
        let admin_password = format!("AdminPass{}", random_hex(16));

        // The port is picked by binding port 0 and releasing it; another process may grab it in
        // between, so retry with a new port if redis-server can't bind.
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let conf = Self::config(dir.path(), pki, port, &access_key, &admin_password);
            let conf_path = dir.path().join("redis.conf");
            std::fs::write(&conf_path, conf).expect("write redis.conf");
            let _ = std::fs::remove_file(dir.path().join("redis.log"));
            let child = Command::new(redis_server_binary())
                .arg(&conf_path)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server (is it installed? apt-get install -y redis-server)");
            let mut server = RedisServer {
                child: Some(child),
                dir,
                port,
                ca_pem: pki.ca_pem().to_string(),
                admin_password: admin_password.clone(),
                access_keys: Mutex::new(vec![access_key.clone()]),
            };
            match server.wait_ready().await {
                Ok(()) => return server,
                Err(e) => {
                    last_error = format!("{e}\n--- redis.log ---\n{}", server.log());
                    server.kill();
                    // Take the directory back for the next attempt.
                    dir =
                        std::mem::replace(&mut server.dir, tempfile::tempdir().expect("temp dir"));
                }
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    fn config(dir: &Path, pki: &TestPki, port: u16, key: &str, admin: &str) -> String {
        format!(
            "bind 127.0.0.1\n\
             port 0\n\
             tls-port {port}\n\
             tls-cert-file {cert}\n\
             tls-key-file {key_file}\n\
             tls-ca-cert-file {ca}\n\
             tls-auth-clients no\n\
             save \"\"\n\
             appendonly no\n\
             dir {dir}\n\
             logfile {dir}/redis.log\n\
             daemonize no\n\
             protected-mode no\n\
             enable-debug-command local\n\
             user default on >{key} ~* &* +@all\n\
             user admin on >{admin} ~* &* +@all\n",
            cert = pki.cert_path().display(),
            key_file = pki.key_path().display(),
            ca = pki.ca_path().display(),
            dir = dir.display(),
        )
    }

    /// Polls until an admin connection answers `PING`, or the process died, or time is up.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last = String::from("not tried");
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("redis-server exited early: {status}"));
            }
            let attempt = async {
                let mut con = self.try_admin().await?;
                redis::cmd("PING").query_async::<String>(&mut con).await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "PING timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("not ready after {STARTUP_TIMEOUT:?}: {last}"))
    }

    /// The TLS port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, e.g. for the proxy's `--upstream`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The current (first) access key: the `default` user's password, `AUTH <key>`.
    pub fn access_key(&self) -> String {
        self.access_keys.lock().unwrap()[0].clone()
    }

    /// The admin user's password.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A `redis` crate client that logs in as `user`/`password` over TLS trusting the test CA
    /// (e.g. `client("admin", …)`, or `client("default", key)`).
    pub fn client(&self, user: &str, password: &str) -> redis::Client {
        // `rediss://user:password@127.0.0.1:port/`: the certificate has an IP SAN for 127.0.0.1.
        let mut url = url::Url::parse(&format!("rediss://127.0.0.1:{}/", self.port)).unwrap();
        url.set_username(user).unwrap();
        url.set_password(Some(password)).unwrap();
        redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(self.ca_pem.as_bytes().to_vec()),
            },
        )
        .expect("build TLS redis client")
    }

    async fn try_admin(&self) -> redis::RedisResult<MultiplexedConnection> {
        self.client("admin", &self.admin_password)
            .get_multiplexed_async_connection()
            .await
    }

    /// A new admin connection (all permissions) straight to the server, bypassing any front.
    pub async fn admin(&self) -> MultiplexedConnection {
        self.try_admin().await.expect("admin connection to redis")
    }

    /// Forbids the access-key user the `COMMAND` command (`ACL SETUSER default -command`): what
    /// a multiplexing proxy reads its allow-list from.
    pub async fn forbid_command_command(&self) {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("-command")
            .query_async(&mut self.admin().await)
            .await
            .expect("ACL SETUSER default -command");
    }

    /// Replaces the access keys (`ACL SETUSER default resetpass >k1 >k2 …`), as when a key is
    /// regenerated on Azure. Existing connections stay authenticated, as in Redis.
    pub async fn set_access_keys(&self, keys: &[&str]) {
        assert!(!keys.is_empty(), "at least one access key");
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg("default").arg("resetpass");
        for k in keys {
            cmd.arg(format!(">{k}"));
        }
        let _: () = cmd
            .query_async(&mut self.admin().await)
            .await
            .expect("ACL SETUSER default");
        *self.access_keys.lock().unwrap() = keys.iter().map(|k| k.to_string()).collect();
    }

    /// `CLIENT LIST`, parsed. Includes admin connections (user `admin`): see
    /// [`Self::app_clients`] for the others.
    pub async fn clients(&self) -> Vec<ClientInfo> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut self.admin().await)
            .await
            .expect("CLIENT LIST");
        list.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let fields: HashMap<String, String> = line
                    .split(' ')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
                ClientInfo {
                    id: get("id").parse().unwrap_or(0),
                    addr: get("addr"),
                    name: get("name"),
                    user: get("user"),
                    db: get("db").parse().unwrap_or(0),
                    cmd: get("cmd"),
                    flags: get("flags"),
                    resp: get("resp").parse().unwrap_or(2),
                    fields,
                }
            })
            .collect()
    }

    /// `CLIENT LIST` without the connections of the `admin` user (the test's and the front's).
    pub async fn app_clients(&self) -> Vec<ClientInfo> {
        self.clients()
            .await
            .into_iter()
            .filter(|c| c.user != "admin")
            .collect()
    }

    /// Kills the server process now (an upstream outage). Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
