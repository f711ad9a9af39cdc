//! The `edgebridge` command: parses the command line, sets up logging, loads the
//! configuration and hands over to [`edgebridge::bridge::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use edgebridge::bridge::{self, RunOptions};
use edgebridge::config::{self, LoadOptions};

#[derive(Parser)]
#[command(
    name = "edgebridge",
    version,
    about = "MQTT bridge host for MqttBridgeConnector / MqttBridgeTopicMap YAML"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge.
    Run {
        #[command(flatten)]
        files: RunSource,
        /// This process's instance index among `bridgeInstances` (default: the ordinal at the
        /// end of the host name, as in a StatefulSet, or 0 when bridgeInstances is 1).
        #[arg(long)]
        instance: Option<u32>,
        /// Identity used for loop prevention (default: connector name plus a random suffix).
        #[arg(long)]
        bridge_id: Option<String>,
        /// Most messages a route client forwards before the target acknowledges them (1 to
        /// 65535; it is announced as MQTT 5 Receive Maximum, where 0 is a protocol error).
        #[arg(long, default_value_t = edgebridge::bridge::DEFAULT_MAX_INFLIGHT, value_parser = clap::value_parser!(u16).range(1..))]
        max_inflight: u16,
        /// Most bytes (payloads and topics) a route client forwards before the target
        /// acknowledges them; past it the route stops reading its source (MiB).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
        max_inflight_mib: u64,
        /// Store and forward: spool every route client under this folder (each in
        /// <DIR>/<connector>/<client id>), so a remote outage loses nothing the source
        /// acknowledged; the YAML's `spool` settings override it per connector or route.
        #[arg(long, env = "EDGEBRIDGE_SPOOL_DIR")]
        spool_dir: Option<std::path::PathBuf>,
        /// Longest delay between reconnect attempts, seconds.
        #[arg(long, default_value_t = 30)]
        max_backoff: u64,
        /// Keep-alive of every session, seconds; a dead connection is noticed within 1.5x
        /// this.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=65535))]
        keep_alive: u64,
        /// Serve /metrics, /healthz, /readyz and /status on this address (e.g. 0.0.0.0:9102).
        #[arg(long, env = "EDGEBRIDGE_HTTP")]
        http: Option<std::net::SocketAddr>,
        /// /healthz fails when a route has had messages in flight and none acknowledged for
        /// this many seconds.
        #[arg(long, default_value_t = 60)]
        stall_timeout: u64,
        /// CPU scheduling policy of the bridge's threads: `normal`, or `batch` (Linux's
        /// SCHED_BATCH: a woken bridge thread does not preempt a running broker and reads what
        /// arrived meanwhile in one go; less CPU per message at full load on shared cores, more
        /// latency when every core is busy; docs/benchmarks.md).
        #[arg(long, default_value = "normal", value_parser = ["normal", "batch"], env = "EDGEBRIDGE_SCHEDULING")]
        scheduling: String,
        #[command(flatten)]
        logs: LogArgs,
        #[command(flatten)]
        plugin_dirs: PluginDirs,
    },
    /// Show a running bridge's state: routes, sessions, rates, in flight, errors, plugins.
    Status {
        /// The bridge's --http address.
        #[arg(long, env = "EDGEBRIDGE_HTTP", default_value = "127.0.0.1:9102")]
        http: String,
        /// Print the /status JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List the plugins of a folder: world, size, sha256, policy; refused files and why.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Work with one plugin file.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Validate the configuration, and the plugins and policies its routes use; print every
    /// problem.
    Check {
        #[command(flatten)]
        files: Files,
        #[command(flatten)]
        plugin_dirs: PluginDirs,
    },
    /// Publish test messages (a minimal MQTT client, for trying a bridge out).
    Pub {
        #[command(flatten)]
        client: ClientArgs,
        /// Topic.
        #[arg(short, long)]
        topic: String,
        // Payload (the help text is `message_help`'s).
        #[arg(short, long, default_value = "hello {n}", help = message_help())]
        message: String,
        /// How many messages.
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u64,
        /// Milliseconds between messages (default: all at once), e.g. 100 for a 10 Hz sensor.
        #[arg(long)]
        interval_ms: Option<u64>,
        /// Set the retain flag.
        #[arg(short, long)]
        retain: bool,
        /// Give up (exit 1) after this many seconds without progress: the broker unreachable
        /// or not acknowledging.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        wait: u64,
    },
    /// Subscribe and print `topic payload` lines (a minimal MQTT client).
    Sub {
        #[command(flatten)]
        client: ClientArgs,
        /// Topic filter.
        #[arg(short, long)]
        topic: String,
        /// Exit after this many messages (0: never).
        #[arg(short = 'C', long, default_value_t = 0)]
        count: u64,
        /// Give up (exit 1) when not subscribed within this many seconds of starting or of
        /// losing the connection.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        wait: u64,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Load every *.wasm of the plugins folder against its policy and describe it.
    List {
        #[command(flatten)]
        plugin_dirs: PluginDirs,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create a plugin crate (a route-mapper, or a message-filter with --filter) that builds
    /// anywhere with `cargo build --target wasm32-wasip2 --release` or `cargo component build
    /// --release`, with a unit test, a README, a policy and sample messages.
    New {
        /// The plugin's name (lowercase letters, digits, '-'): the crate, the `.wasm` and the
        /// name routes use.
        name: String,
        /// A message-filter (keep or drop) instead of a route-mapper.
        #[arg(long, conflicts_with = "aggregator")]
        filter: bool,
        /// A route-aggregator (WIT 0.2.0: windows and timers; a windowed average to start
        /// from) instead of a route-mapper.
        #[arg(long)]
        aggregator: bool,
        /// The folder to create (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where the crate gets edgebridge-plugin-sdk: the SDK folder (plugins/sdk of an
        /// edgebridge checkout), a git URL of the edgebridge repository, or a version on
        /// crates.io once it is published there (`0.1`) (default: the sources this binary
        /// was built from).
        #[arg(long)]
        sdk: Option<String>,
    },
    /// Check that a built component loads under its policy, then copy it into the plugins
    /// folder as <name>.wasm, atomically (a running bridge picks it up).
    Install {
        /// The component (.wasm), e.g. target/wasm32-wasip2/release/site_prefix.wasm.
        file: PathBuf,
        /// The plugin name (default: the file name with '_' as '-').
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        plugin_dirs: PluginDirs,
    },
    /// Run a plugin on sample messages in the production engine, under its policy: prints
    /// what it logs, each decision and the time per call; exits 1 when it fails.
    Test {
        /// The component (.wasm).
        file: PathBuf,
        /// The plugin name, which picks its policy (default: the file stem with '_' as '-').
        #[arg(long)]
        name: Option<String>,
        /// The plugin's config, as JSON (a route's `config:`).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Topic of the sample message.
        #[arg(long, default_value = "factory/line1/telemetry")]
        topic: String,
        /// Payload of the sample message; @PATH reads it from a file.
        #[arg(short, long, default_value = "{}")]
        message: String,
        /// A user property KEY=VALUE of the sample message; may repeat.
        #[arg(short = 'p', long = "property")]
        properties: Vec<String>,
        /// QoS of the sample message.
        #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Set the sample message's retain flag.
        #[arg(short, long)]
        retain: bool,
        /// Messages as JSON lines instead of the sample message (`{"topic": …, "payload":
        /// …, "qos": …, "retain": …, "userProperties": {…}, "contentType": …, "at": MS}`),
        /// `at` placing each on a timeline whose timers fire in between; `-` reads stdin.
        #[arg(long, conflicts_with_all = ["message", "properties"])]
        messages: Option<PathBuf>,
        /// The route's source filter.
        #[arg(long, default_value = "#")]
        source: String,
        /// The route's static target (default: same as source).
        #[arg(long)]
        target: Option<String>,
        /// Also time this many further calls per message and print the median.
        #[arg(long, default_value_t = 0)]
        repeat: u32,
        /// Go on this many milliseconds past the last message's `at`, firing the timers an
        /// aggregator set (then it is flushed as at a route's stop).
        #[arg(long)]
        until: Option<u64>,
        /// Folder of plugin policies.
        #[arg(long, default_value = edgebridge::bridge::DEFAULT_POLICIES_DIR, env = "EDGEBRIDGE_POLICIES_DIR")]
        policies_dir: PathBuf,
    },
}

#[derive(Args)]
struct LogArgs {
    /// Log level (overrides `logLevel`; RUST_LOG overrides both).
    #[arg(long)]
    log_level: Option<String>,
    /// `text` (colours only on a terminal) or `json` (one object per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "EDGEBRIDGE_LOG_FORMAT")]
    log_format: String,
}

#[derive(Args)]
struct PluginDirs {
    /// Folder of plugin components (<name>.wasm), watched for changes.
    #[arg(long, default_value = edgebridge::bridge::DEFAULT_PLUGINS_DIR, env = "EDGEBRIDGE_PLUGINS_DIR")]
    plugins_dir: PathBuf,
    /// Folder of plugin policies (*.yaml).
    #[arg(long, default_value = edgebridge::bridge::DEFAULT_POLICIES_DIR, env = "EDGEBRIDGE_POLICIES_DIR")]
    policies_dir: PathBuf,
}

#[derive(Args)]
struct ClientArgs {
    /// Broker host:port.
    #[arg(short, long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// QoS 0, 1 or 2.
    #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Speak MQTT 3.1.1 instead of 5.
    #[arg(long)]
    v3: bool,
    /// Client ID (default: edgebridge-<pid>).
    #[arg(short = 'i', long)]
    client_id: Option<String>,
}

impl ClientArgs {
    fn target(&self) -> edgebridge::tools::Target {
        edgebridge::tools::Target {
            endpoint: self.broker.clone(),
            v5: !self.v3,
            client_id: self
                .client_id
                .clone()
                .unwrap_or_else(|| format!("edgebridge-{}", std::process::id())),
        }
    }

    fn qos(&self) -> edgebridge::model::QoS {
        edgebridge::model::QoS::from_u8(self.qos).unwrap_or(edgebridge::model::QoS::AtLeastOnce)
    }
}

/// `pub --message`'s help. clap turns every `{n}` of a help text into a line break, so the
/// placeholder is written with a style reset between `{` and `n}`: an escape sequence that
/// clap strips from plain output and a terminal does not show.
fn message_help() -> clap::builder::StyledStr {
    "Payload; `{\x1b[0mn}` is replaced by the message's sequence number".into()
}

fn run_tool(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(fut))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
struct Files {
    /// YAML files or folders (every *.yaml / *.yml inside); may repeat.
    #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
    files: Vec<PathBuf>,
    /// Folder holding one folder per Kubernetes Secret named in the YAML.
    #[arg(long, default_value = config::DEFAULT_SECRETS_DIR, env = "EDGEBRIDGE_SECRETS_DIR")]
    secrets_dir: PathBuf,
    /// Folder holding one folder per Kubernetes ConfigMap named in the YAML.
    #[arg(long, default_value = config::DEFAULT_CONFIGMAPS_DIR, env = "EDGEBRIDGE_CONFIGMAPS_DIR")]
    configmaps_dir: PathBuf,
}

/// Where `run` takes its configuration from: files and folders, or the Kubernetes API.
#[derive(Args)]
struct RunSource {
    /// YAML files or folders (every *.yaml / *.yml inside); may repeat.
    #[arg(short = 'f', long = "file", required_unless_present = "kubernetes", conflicts_with = "kubernetes", num_args = 1..)]
    files: Vec<PathBuf>,
    /// Run the MqttBridgeConnector and MqttBridgeTopicMap resources of the namespace, watched
    /// through the Kubernetes API (in a pod: its service account; elsewhere KUBECONFIG or
    /// ~/.kube/config), and write their status back; instead of -f.
    #[arg(long)]
    kubernetes: bool,
    /// The namespace to watch with --kubernetes (default: the pod's, or the kubeconfig
    /// context's, or `default`).
    #[arg(long, requires = "kubernetes", env = "EDGEBRIDGE_NAMESPACE")]
    namespace: Option<String>,
    /// Folder holding one folder per Kubernetes Secret named in the YAML.
    #[arg(long, default_value = config::DEFAULT_SECRETS_DIR, env = "EDGEBRIDGE_SECRETS_DIR")]
    secrets_dir: PathBuf,
    /// Folder holding one folder per Kubernetes ConfigMap named in the YAML.
    #[arg(long, default_value = config::DEFAULT_CONFIGMAPS_DIR, env = "EDGEBRIDGE_CONFIGMAPS_DIR")]
    configmaps_dir: PathBuf,
}

impl RunSource {
    fn files(&self) -> Files {
        Files {
            files: self.files.clone(),
            secrets_dir: self.secrets_dir.clone(),
            configmaps_dir: self.configmaps_dir.clone(),
        }
    }
}

impl Files {
    fn source(&self) -> bridge::ConfigSource {
        bridge::ConfigSource {
            files: self.files.clone(),
            load: LoadOptions {
                secrets_dir: self.secrets_dir.clone(),
                configmaps_dir: self.configmaps_dir.clone(),
            },
        }
    }

    fn load(&self) -> Result<config::Config, config::ConfigReport> {
        let s = self.source();
        config::load(&s.files, &s.load)
    }
}

/// Logs to standard error through a bounded queue (see `edgebridge::logging`); keep the
/// guard until the end.
fn init_logging(level: &str, format: &str) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},rumqttd=off")));
    let (writer, guard) = edgebridge::logging::non_blocking_stderr();
    let lines = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(writer);
    let lines = if format == "json" {
        // One object per line: timestamp, level, message and the fields (route, side,
        // plugin, client_id...) flattened beside it.
        lines.json().flatten_event(true).boxed()
    } else {
        lines.with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    // rumqttd's own log stays out of the bridge's; its warning that a subscriber skipped
    // part of an embedded broker's log is counted (and logged by the bridge) whatever the
    // level.
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(edgebridge::embedded::log_skips_layer())
        .init();
    guard
}

/// `file:line: ` of the first route that uses `plugin` ("" when none does).
fn route_origin(cfg: &config::Config, plugin: &str) -> String {
    cfg.connectors
        .iter()
        .flat_map(|c| &c.routes)
        .find(|r| r.plugins.iter().any(|p| p.name == plugin))
        .map(|r| format!("{}: ", r.origin))
        .unwrap_or_default()
}

/// `check`'s lines for plugin and policy problems, in the `file:line: message` form of the
/// configuration's: a plugin's problem is placed at the route that uses it.
fn plugin_problems(cfg: &config::Config, e: &bridge::BridgeError) -> Vec<String> {
    match e {
        bridge::BridgeError::Plugins(errors) => errors
            .iter()
            .map(|e| {
                let at = match e {
                    edgebridge::plugin::PluginError::Init { route, .. } => cfg
                        .connectors
                        .iter()
                        .flat_map(|c| &c.routes)
                        .find(|r| &r.name == route)
                        .map(|r| format!("{}: ", r.origin))
                        .unwrap_or_default(),
                    other => route_origin(cfg, &other.plugin()),
                };
                format!("{at}{e}")
            })
            .collect(),
        bridge::BridgeError::Policies(report) => {
            report.errors.iter().map(|e| e.to_string()).collect()
        }
        other => vec![other.to_string()],
    }
}

fn plugin_command(command: PluginCommand) -> ExitCode {
    use edgebridge::tools::{plugin_test, scaffold};
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    };
    match command {
        PluginCommand::New {
            name,
            filter,
            aggregator,
            dir,
            sdk,
        } => {
            let sdk = match sdk {
                Some(arg) => match scaffold::Sdk::parse(&arg) {
                    Ok(s) => s,
                    Err(e) => return fail(e),
                },
                None => match scaffold::default_sdk() {
                    Some(p) => scaffold::Sdk::Path(p),
                    None => {
                        return fail(
                            "the SDK of the sources this binary was built from is gone: pass --sdk with the path of plugins/sdk of an edgebridge checkout, or a git URL of the edgebridge repository".into(),
                        );
                    }
                },
            };
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let new = scaffold::NewPlugin {
                name,
                filter,
                aggregator,
                sdk,
                dir,
            };
            match scaffold::new_plugin(&new) {
                Ok(files) => {
                    for f in files {
                        println!("created {}", f.display());
                    }
                    let d = new.dir.display();
                    println!(
                        "\nNext: cd {d} && cargo test && cargo build --target wasm32-wasip2 --release\n(then see {d}/README.md to try and install it)"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        PluginCommand::Install {
            file,
            name,
            plugin_dirs,
        } => match scaffold::install(
            &file,
            name.as_deref(),
            &plugin_dirs.plugins_dir,
            &plugin_dirs.policies_dir,
        ) {
            Ok(i) => {
                println!(
                    "installed {} ({}, {} bytes, sha256 {}) as {}",
                    i.name,
                    i.world,
                    i.size,
                    i.sha256,
                    i.path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        PluginCommand::Test {
            file,
            name,
            config,
            topic,
            message,
            properties,
            qos,
            retain,
            messages,
            source,
            target,
            repeat,
            until,
            policies_dir,
        } => {
            let qos =
                edgebridge::model::QoS::from_u8(qos).unwrap_or(edgebridge::model::QoS::AtLeastOnce);
            let messages = match &messages {
                Some(path) => {
                    // A file, or `-`: standard input, bounded the same way.
                    let (bytes, origin) = if path.as_os_str() == "-" {
                        let origin = "stdin".to_string();
                        (plugin_test::read_bounded(std::io::stdin(), &origin), origin)
                    } else {
                        (plugin_test::read_input(path), path.display().to_string())
                    };
                    let text = match bytes.and_then(|b| {
                        String::from_utf8(b).map_err(|_| format!("{origin}: not UTF-8 text"))
                    }) {
                        Ok(t) => t,
                        Err(e) => return fail(e),
                    };
                    plugin_test::messages_from_json_lines(&text, &origin, &topic)
                }
                None => plugin_test::message_from_args(&topic, &message, &properties, qos, retain)
                    .map(|m| vec![(0, m)]),
            };
            let messages = match messages {
                Ok(m) => m,
                Err(e) => return fail(e),
            };
            let t = plugin_test::PluginTest {
                file,
                name,
                policies_dir,
                config,
                source,
                target,
                repeat,
                messages,
                until,
            };
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            match rt.block_on(plugin_test::run(&t)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("error: the plugin failed on a message (see above)");
                    ExitCode::FAILURE
                }
                Err(e) => fail(e),
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plugins {
            command: PluginsCommand::List { plugin_dirs },
        } => {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            match rt.block_on(edgebridge::tools::plugins_list(
                &plugin_dirs.plugins_dir,
                &plugin_dirs.policies_dir,
            )) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plugin { command } => plugin_command(command),
        Command::Pub {
            client,
            topic,
            message,
            count,
            interval_ms,
            retain,
            wait,
        } => run_tool(async {
            edgebridge::tools::publish(
                &client.target(),
                &topic,
                client.qos(),
                retain,
                &message,
                (count, interval_ms.map(Duration::from_millis)),
                Duration::from_secs(wait),
            )
            .await
        }),
        Command::Sub {
            client,
            topic,
            count,
            wait,
        } => run_tool(async {
            edgebridge::tools::subscribe(
                &client.target(),
                &topic,
                client.qos(),
                count,
                Duration::from_secs(wait),
            )
            .await
        }),
        Command::Check { files, plugin_dirs } => match files.load() {
            Ok(cfg) => {
                for w in cfg.warnings() {
                    eprintln!("warning: {w}");
                }
                let rt = tokio::runtime::Runtime::new().expect("runtime");
                match rt.block_on(edgebridge::bridge::load_plugins(
                    &cfg,
                    &plugin_dirs.plugins_dir,
                    &plugin_dirs.policies_dir,
                )) {
                    Err(e) => {
                        let problems = plugin_problems(&cfg, &e);
                        for p in &problems {
                            eprintln!("{p}");
                        }
                        eprintln!("{} problem(s) found.", problems.len());
                        return ExitCode::FAILURE;
                    }
                    Ok(Some(loaded)) => {
                        for m in &loaded.missing {
                            eprintln!(
                                "{}warning: {m} (the route will wait for it)",
                                route_origin(&cfg, &m.plugin())
                            );
                        }
                    }
                    Ok(None) => {}
                }
                for c in &cfg.connectors {
                    println!(
                        "MqttBridgeConnector \"{}\": {} route(s), {} instance(s), protocol {:?}, local {}, remote {}",
                        c.name,
                        c.routes.len(),
                        c.bridge_instances,
                        c.protocol,
                        c.local.endpoint,
                        c.remote.endpoint
                    );
                }
                println!("Configuration is valid.");
                ExitCode::SUCCESS
            }
            Err(report) => {
                eprintln!("{report}");
                eprintln!("{} problem(s) found.", report.errors.len());
                ExitCode::FAILURE
            }
        },
        Command::Status { http, json } => run_tool(async move {
            let url = format!("http://{http}/status");
            let fetch = || async {
                let r = edgebridge::http_client::get(&url, &[], Duration::from_secs(5), 16 << 20)
                    .await
                    .map_err(|e| format!("{url}: {}", edgebridge::error::chain(&e)))?;
                serde_json::from_slice::<serde_json::Value>(&r.body)
                    .map_err(|e| format!("{url} answered {}: not /status JSON ({e})", r.status))
            };
            let first = fetch().await?;
            if json {
                println!("{first:#}");
                return Ok(());
            }
            let interval = Duration::from_secs(1);
            tokio::time::sleep(interval).await;
            let second = fetch().await?;
            print!(
                "{}",
                edgebridge::tools::status_table::render(&second, Some(&first), interval)
            );
            Ok(())
        }),
        Command::Run {
            files,
            instance,
            bridge_id,
            max_inflight,
            max_inflight_mib,
            max_backoff,
            keep_alive,
            http,
            stall_timeout,
            spool_dir,
            scheduling,
            logs,
            plugin_dirs,
        } => {
            // Before any thread starts, so that every thread inherits it; said once logging is
            // up.
            let scheduled = (scheduling == "batch").then(edgebridge::scheduling::batch);
            let kubernetes = files.kubernetes.then(|| files.namespace.clone());
            let load = LoadOptions {
                secrets_dir: files.secrets_dir.clone(),
                configmaps_dir: files.configmaps_dir.clone(),
            };
            let files = files.files();
            let loaded = if kubernetes.is_some() {
                Ok(config::Config::default())
            } else {
                files.load()
            };
            let cfg = match loaded {
                Ok(cfg) => cfg,
                Err(report) => {
                    eprintln!("{report}");
                    eprintln!("{} problem(s) found; nothing started.", report.errors.len());
                    return ExitCode::FAILURE;
                }
            };
            let level = logs.log_level.clone().unwrap_or_else(|| {
                cfg.connectors
                    .first()
                    .map(|c| c.log_level.as_str().to_string())
                    .unwrap_or_else(|| "info".into())
            });
            let _log = init_logging(&level, &logs.log_format);
            match scheduled {
                Some(Ok(())) => {
                    tracing::info!("Scheduling policy: SCHED_BATCH (--scheduling batch)")
                }
                Some(Err(e)) => tracing::warn!(
                    "{}; the bridge runs with the policy it was started with",
                    edgebridge::error::Chain(&e)
                ),
                None => {}
            }
            for w in cfg.warnings() {
                tracing::warn!("{w}");
            }
            let opts = RunOptions {
                instance,
                bridge_id,
                max_inflight,
                max_inflight_bytes: (max_inflight_mib as usize) << 20,
                backoff: (
                    Duration::from_millis(100),
                    Duration::from_secs(max_backoff.max(1)),
                ),
                keep_alive: Duration::from_secs(keep_alive),
                http,
                stall_timeout: Duration::from_secs(stall_timeout.max(1)),
                spool_dir,
                plugins_dir: plugin_dirs.plugins_dir,
                policies_dir: plugin_dirs.policies_dir,
                ..RunOptions::default()
            };
            if let Err(e) = bridge::check_file_descriptors(&cfg, &opts) {
                tracing::error!("{e}; nothing started");
                return ExitCode::FAILURE;
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = match kubernetes {
                Some(namespace) => runtime.block_on(async {
                    let (client, ns) = match edgebridge::kubernetes::client(namespace).await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::error!("{}; nothing started", edgebridge::error::chain(&e));
                            return Ok(false);
                        }
                    };
                    bridge::run_kubernetes(client, &ns, &load, &opts, shutdown_signal())
                        .await
                        .map(|()| true)
                }),
                None => {
                    let source = files.source();
                    runtime
                        .block_on(bridge::run(&cfg, Some(&source), &opts, shutdown_signal()))
                        .map(|()| true)
                }
            };
            let result = match result {
                Ok(false) => return ExitCode::FAILURE,
                Ok(true) => Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    for line in edgebridge::error::chain(&e).lines() {
                        tracing::error!("{line}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
