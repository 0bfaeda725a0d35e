//! `HaConfig`: the example files parse, unknown keys are refused, every validation rule names
//! its dotted path, and the environment overrides the file (through the `ha-node` binary, so
//! no test mutates its own environment).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ha_orchestrator::{Error, HaConfig};

/// A valid base: one node alone with one check.
const BASE: &str = r#"
node_id = "a"
cluster = "orders"
[redundancy]
single_node = true
[[checks]]
name = "api"
kind = "tcp"
address = "127.0.0.1:8080"
"#;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config")
}

/// Parses `text` and returns the error's text (panics if it parses).
fn refused(text: &str) -> String {
    match HaConfig::from_toml_str(text, "test.toml") {
        Ok(config) => panic!("accepted an invalid config: {config:?}"),
        Err(e) => {
            assert!(matches!(e, Error::ConfigFile { .. }), "{e:?}");
            assert!(e.is_config());
            let text = e.to_string();
            assert!(
                text.starts_with("test.toml: "),
                "the error names the file: {text}"
            );
            text
        }
    }
}

/// A `pg_base` source named `name` (whole-cluster base backups) with `extra` lines.
fn pg_base_source(name: &str, extra: &str) -> String {
    format!(
        "[disaster_recovery.sources.{name}]\nkind = \"pg_base\"\n\
         url = \"postgres://replicator@db:5432/postgres\"\ninterval = \"1h\"\n{extra}"
    )
}

#[test]
fn pg_base_sources_and_their_wal_rpo_are_checked() {
    let config = HaConfig::from_toml_str(
        &with_dr(&format!(
            "key_env = \"K\"\n{}",
            pg_base_source("cluster", "wal_rpo = \"5m\"\n")
        )),
        "ok",
    )
    .expect("a pg_base source with a WAL RPO");
    let dr = config.disaster_recovery.expect("a DR section");
    assert_eq!(
        dr.sources["cluster"].wal_rpo,
        Some(std::time::Duration::from_secs(300))
    );
    assert_refused(
        &with_dr("key_env = \"K\"\n[disaster_recovery.sources.c]\nkind = \"pg_base\"\n"),
        "disaster_recovery.sources.c.url",
        "is required",
    );
    assert_refused(
        &with_dr(&format!("key_env = \"K\"\n{SOURCE}wal_rpo = \"5m\"\n")),
        "disaster_recovery.sources.docs.wal_rpo",
        "only for kind \"pg_base\"",
    );
    assert_refused(
        &with_dr(&format!(
            "key_env = \"K\"\n{}",
            pg_base_source("c", "wal_rpo = \"0s\"\n")
        )),
        "disaster_recovery.sources.c.wal_rpo",
        "must be positive",
    );
    assert_refused(
        &with_dr(&format!(
            "key_env = \"K\"\n{}{}",
            pg_base_source("a", "wal_rpo = \"5m\"\n"),
            pg_base_source("b", "wal_rpo = \"5m\"\n")
        )),
        "disaster_recovery.sources.b.wal_rpo",
        "one WAL archive",
    );
}

/// A node built from a config with `wal_rpo` runs the WAL RPO monitor: with nothing archived
/// into its repository, it reports a breach (kind `wal`) once it has led for longer than
/// the objective.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_rpo_runs_the_monitor_on_the_node() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "{BASE}\n[disaster_recovery]\nrepository = \"{}\"\nkey_file = \"{}\"\n{}",
        dir.path().join("repo").display(),
        key.display(),
        pg_base_source("cluster", "wal_rpo = \"1s\"\n")
    );
    let config = HaConfig::from_toml_str(&text, "wal-rpo.toml").expect("valid");
    let node = config
        .into_builder()
        .await
        .expect("wires the sources")
        .build()
        .expect("builds");
    let mut events = node.bus().subscribe();
    node.start().await.expect("starts");
    let kind = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            if let Ok(ha_core::HaEvent::RpoBreached { kind, .. }) = events.recv().await
                && kind == "wal"
            {
                break kind;
            }
        }
    })
    .await
    .expect("the WAL RPO monitor reported a breach");
    assert_eq!(kind, "wal");
    node.shutdown().await;
}

fn assert_refused(text: &str, path: &str, rule: &str) {
    let err = refused(text);
    assert!(err.contains(path), "{err:?} does not name {path:?}");
    assert!(err.contains(rule), "{err:?} does not state {rule:?}");
}

#[test]
fn every_example_config_parses() {
    let mut files: Vec<PathBuf> = [
        examples_dir(),
        examples_dir().join("redis-ha"),
        examples_dir().join("pg-cluster"),
    ]
    .iter()
    .flat_map(|dir| std::fs::read_dir(dir).expect("examples/config"))
    .map(|e| e.expect("entry").path())
    .filter(|p| p.extension().is_some_and(|e| e == "toml"))
    .collect();
    for expected in ["redis-ha/ha-node.toml", "pg-cluster/node-1.toml"] {
        assert!(files.iter().any(|f| f.ends_with(expected)), "{files:?}");
    }
    files.sort();
    assert!(
        files.len() >= 2,
        "expected example configs, found {files:?}"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let config = HaConfig::from_toml_str(&text, &file.display().to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!config.node_id.is_empty(), "{}", file.display());
        HaConfig::load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

#[test]
fn the_base_config_parses_with_its_values() {
    let config = HaConfig::from_toml_str(BASE, "base").expect("valid");
    assert_eq!(config.node_id, "a");
    assert_eq!(config.cluster, "orders");
    assert!(config.redundancy.single_node);
    assert_eq!(config.checks.len(), 1);
    assert_eq!(config.checks[0].address.as_deref(), Some("127.0.0.1:8080"));
}

#[test]
fn unknown_fields_are_refused_at_every_level() {
    let top = refused(&format!("node_name = \"x\"\n{BASE}"));
    assert!(top.contains("node_name"), "{top}");
    assert!(top.contains("unknown field"), "{top}");

    let nested = refused(&BASE.replace("single_node = true", "single_node = true\nttl_ms = 5"));
    assert!(nested.contains("redundancy"), "the path is named: {nested}");
    assert!(nested.contains("ttl_ms"), "{nested}");

    let in_array = refused(&format!("{BASE}intervall = \"5s\"\n"));
    assert!(in_array.contains("checks"), "the path is named: {in_array}");
    assert!(in_array.contains("intervall"), "{in_array}");

    let action = refused(
        r#"
node_id = "a"
[redundancy]
single_node = true
[[checks]]
name = "api"
kind = "memory"
[[failover.components]]
name = "api"
action = { kind = "command", command = ["true"], shell = "sh" }
"#,
    );
    assert!(action.contains("failover.components"), "{action}");
    assert!(action.contains("shell"), "{action}");
}

#[test]
fn node_id_is_required() {
    assert_refused(
        &BASE.replace("node_id = \"a\"", ""),
        "`node_id`",
        "must not be empty",
    );
}

#[test]
fn failover_components_need_a_check_of_their_name() {
    let text = format!(
        "{BASE}
[[failover.components]]
name = \"api\"
action = {{ kind = \"command\", command = [\"true\"] }}
[[failover.components]]
name = \"cache\"
action = {{ kind = \"command\", command = [\"true\"] }}
"
    );
    assert_refused(
        &text,
        "failover.components[1].name",
        "no health check named \"cache\"",
    );
}

#[test]
fn failover_dependencies_and_actions_are_checked() {
    let text = format!(
        "{BASE}
[[failover.components]]
name = \"api\"
depends_on = [\"db\"]
action = {{ kind = \"command\", command = [\"true\"] }}
"
    );
    assert_refused(
        &text,
        "failover.components[0].depends_on",
        "unknown component \"db\"",
    );
    let text = format!(
        "{BASE}
[[failover.components]]
name = \"api\"
action = {{ kind = \"command\", command = [] }}
"
    );
    assert_refused(
        &text,
        "failover.components[0].action.command",
        "must name a program",
    );
    let text = format!(
        "{BASE}
[[failover.components]]
name = \"api\"
action = {{ kind = \"step_down\" }}
"
    );
    assert_refused(&text, "failover.components[0].action", "needs an election");
}

#[test]
fn check_dependencies_must_exist() {
    let text = format!("{BASE}depends_on = [\"db\"]\n");
    assert_refused(&text, "checks[0].depends_on", "unknown check \"db\"");
}

#[test]
fn duplicate_check_names_are_refused() {
    let text = format!("{BASE}\n[[checks]]\nname = \"api\"\nkind = \"memory\"\n");
    assert_refused(&text, "checks[1].name", "duplicate check \"api\"");
}

#[test]
fn each_kind_of_check_takes_its_own_fields() {
    let redis = BASE.replace(
        "kind = \"tcp\"\naddress = \"127.0.0.1:8080\"",
        "kind = \"redis\"",
    );
    assert_refused(&redis, "checks[0].url", "is required for kind \"redis\"");
    let tcp_with_url = format!("{BASE}url = \"http://x\"\n");
    assert_refused(
        &tcp_with_url,
        "checks[0].url",
        "does not apply to kind \"tcp\"",
    );
    let disk = BASE.replace(
        "kind = \"tcp\"\naddress = \"127.0.0.1:8080\"",
        "kind = \"disk\"",
    );
    assert_refused(&disk, "checks[0].path", "is required for kind \"disk\"");
    let memory_with_path = BASE.replace(
        "kind = \"tcp\"\naddress = \"127.0.0.1:8080\"",
        "kind = \"memory\"\npath = \"/\"",
    );
    assert_refused(
        &memory_with_path,
        "checks[0].path",
        "does not apply to kind \"memory\"",
    );
    let command = BASE.replace(
        "kind = \"tcp\"\naddress = \"127.0.0.1:8080\"",
        "kind = \"command\"\ncommand = []",
    );
    assert_refused(
        &command,
        "checks[0].command",
        "is required for kind \"command\"",
    );
}

#[test]
fn the_store_scheme_is_checked() {
    let with_store =
        |store: &str| BASE.replace("single_node = true", &format!("store = \"{store}\""));
    assert_refused(
        &with_store("mysql://db/ha"),
        "redundancy.store",
        "must be `memory`",
    );
    for bad in [
        "etcd://",
        "etcd://h",
        "etcd://h:2379,h2",
        "etcd://h:notaport",
    ] {
        assert_refused(
            &with_store(bad),
            "redundancy.store",
            "etcd:// needs host:port",
        );
    }
    // Accepted whatever the features: a build without `etcd` refuses it when it connects
    // (`Unsupported`, see tests/features.rs).
    for ok in [
        "memory",
        "redis://h:6379",
        "redis+sentinel://h:26379/m",
        "postgres://h/db",
        "etcd://10.0.0.1:2379",
        "etcd://a:2379,b:2379,c:2379",
    ] {
        HaConfig::from_toml_str(&with_store(ok), "ok").unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    assert_refused(
        &BASE.replace(
            "single_node = true",
            "single_node = true\nstore = \"memory\"",
        ),
        "redundancy.store",
        "must not be set with single_node",
    );
}

#[test]
fn the_election_timing_is_checked_under_redundancy() {
    let text = BASE.replace(
        "single_node = true",
        "store = \"memory\"\nttl = \"2s\"\nheartbeat = \"5s\"",
    );
    assert_refused(&text, "redundancy.renew_interval", "must be less than");
}

#[test]
fn leader_only_work_needs_an_election() {
    let text = format!(
        "{}
[[failover.components]]
name = \"api\"
action = {{ kind = \"command\", command = [\"true\"] }}
",
        BASE.replace("[redundancy]\nsingle_node = true\n", "")
    );
    assert_refused(&text, "`redundancy`", "leader-only");
}

#[test]
fn the_admin_token_rules() {
    let public = BASE.replace(
        "[redundancy]",
        "[http]\nlisten = \"0.0.0.0:8008\"\n[redundancy]",
    );
    assert_refused(&public, "http.admin_token", "not a loopback address");
    let short = BASE.replace(
        "[redundancy]",
        "[http]\nlisten = \"0.0.0.0:8008\"\nadmin_token = \"short\"\n[redundancy]",
    );
    assert_refused(&short, "http.admin_token", "at least 16 characters");
    let long = BASE.replace(
        "[redundancy]",
        "[http]\nlisten = \"0.0.0.0:8008\"\nadmin_token = \"a-token-of-16+chars\"\n[redundancy]",
    );
    HaConfig::from_toml_str(&long, "ok").expect("a long token is fine");
}

#[test]
fn replication_rules() {
    let sentinel = format!("{BASE}\n[replication.sentinel]\nmaster = \"m\"\nsentinels = []\n");
    assert_refused(
        &sentinel,
        "replication.sentinel.sentinels",
        "at least one sentinel",
    );
    let files = format!(
        "{BASE}\n[[replication.files]]\nsource = \"/a\"\ntarget = \"/b\"\ninterval = \"0s\"\n"
    );
    assert_refused(&files, "replication.files[0].interval", "greater than zero");
}

/// `BASE` with a `[disaster_recovery]` section made of `body`.
fn with_dr(body: &str) -> String {
    format!("{BASE}\n[disaster_recovery]\nrepository = \"/var/lib/ha\"\n{body}")
}

const SOURCE: &str = "[disaster_recovery.sources.docs]\nkind = \"dir\"\npath = \"/srv/docs\"\n";

#[test]
fn dr_rules() {
    HaConfig::from_toml_str(&with_dr(&format!("key_env = \"HA_KEY\"\n{SOURCE}")), "ok")
        .expect("a valid DR section");
    assert_refused(
        &with_dr(SOURCE),
        "disaster_recovery.key_env",
        "set key_env or key_file",
    );
    assert_refused(
        &with_dr(&format!("key_env = \"K\"\nkey_file = \"/k\"\n{SOURCE}")),
        "disaster_recovery.key_file",
        "not both",
    );
    assert_refused(
        &with_dr(&format!(
            "key_env = \"K\"\nencryption = \"aes-128-cbc\"\n{SOURCE}"
        )),
        "disaster_recovery.encryption",
        "aes-256-gcm",
    );
    assert_refused(
        &with_dr(&format!(
            "key_env = \"K\"\ncompression = \"gzip\"\n{SOURCE}"
        )),
        "disaster_recovery.compression",
        "zstd",
    );
    assert_refused(
        &with_dr("key_env = \"K\"\nsources = {}\n"),
        "disaster_recovery.sources",
        "at least one source",
    );
    assert_refused(
        &with_dr("key_env = \"K\"\n[disaster_recovery.sources.db]\nkind = \"postgres\"\n"),
        "disaster_recovery.sources.db.url",
        "is required",
    );
    assert_refused(
        &with_dr("key_env = \"K\"\n[disaster_recovery.sources.docs]\nkind = \"dir\"\n"),
        "disaster_recovery.sources.docs.path",
        "is required",
    );
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, BASE).expect("write");
    let config = HaConfig::load(&good).expect("valid file");
    assert_eq!(config.node_id, "a");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("{BASE}depends_on = [\"db\"]\n")).expect("write");
    let err = HaConfig::load(&bad).expect_err("invalid file").to_string();
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("checks[0].depends_on"), "{err}");

    let missing = dir.path().join("missing.toml");
    let err = HaConfig::load(&missing).expect_err("no file").to_string();
    assert!(err.contains("missing.toml"), "{err}");
}

// ---- the environment, through the binary ----

/// Runs `ha-node --config FILE --check` with exactly `env` (nothing inherited).
fn ha_node_check(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ha-node"));
    command.arg("--config").arg(file).arg("--check").env_clear();
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run ha-node")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn ha_node_check_accepts_a_valid_file_and_refuses_an_invalid_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(&dir, "good.toml", BASE);
    let out = ha_node_check(&good, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("is valid"), "{}", stderr(&out));

    let bad = write(
        &dir,
        "broken.toml",
        &format!("{BASE}depends_on = [\"db\"]\n"),
    );
    let out = ha_node_check(&bad, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("broken.toml"), "{err}");
    assert!(err.contains("checks[0].depends_on"), "{err}");

    let syntax = write(&dir, "syntax.toml", "node_id = \n");
    let out = ha_node_check(&syntax, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("syntax.toml"), "{}", stderr(&out));
}

#[test]
fn ha_node_id_comes_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(&dir, "shared.toml", &BASE.replace("node_id = \"a\"", ""));
    let out = ha_node_check(&file, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("shared.toml"), "{}", stderr(&out));
    assert!(stderr(&out).contains("node_id"), "{}", stderr(&out));

    let out = ha_node_check(&file, &[("HA_NODE_ID", "node-b")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // An id made of digits is still an id.
    let out = ha_node_check(&file, &[("HA_NODE_ID", "7")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn ha_admin_token_comes_from_the_environment_and_is_never_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        &dir,
        "public.toml",
        &BASE.replace(
            "[redundancy]",
            "[http]\nlisten = \"0.0.0.0:8008\"\n[redundancy]",
        ),
    );
    let out = ha_node_check(&file, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("http.admin_token"),
        "{}",
        stderr(&out)
    );

    let out = ha_node_check(&file, &[("HA_ADMIN_TOKEN", "a-token-of-16+chars")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A token of digits only is still a string.
    let out = ha_node_check(&file, &[("HA_ADMIN_TOKEN", "1234567890123456")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = ha_node_check(&file, &[("HA_ADMIN_TOKEN", "too-short")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("at least 16 characters"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("too-short"), "{}", stderr(&out));
}

#[test]
fn ha_store_url_comes_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let failover = format!(
        "{}
[[failover.components]]
name = \"api\"
action = {{ kind = \"command\", command = [\"true\"] }}
",
        BASE.replace("[redundancy]\nsingle_node = true\n", "")
    );
    let file = write(&dir, "elected.toml", &failover);
    let out = ha_node_check(&file, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("redundancy"), "{}", stderr(&out));

    let out = ha_node_check(&file, &[("HA_STORE_URL", "memory")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = ha_node_check(&file, &[("HA_STORE_URL", "etcd://10.0.0.1:2379")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = ha_node_check(&file, &[("HA_STORE_URL", "etcd://10.0.0.1")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("redundancy.store"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("etcd:// needs host:port"),
        "{}",
        stderr(&out)
    );

    // A password in the URL never reaches the terminal.
    let out = ha_node_check(&file, &[("HA_STORE_URL", "mysql://ha:hunter2@db/ha")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
}

#[test]
fn nested_keys_come_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    // heartbeat 1s needs a ttl above it: the file's ttl is too short, the environment's not.
    let text = BASE.replace(
        "single_node = true",
        "store = \"memory\"\nttl = \"500ms\"\nheartbeat = \"1s\"\nretry = \"100ms\"",
    );
    let file = write(&dir, "timing.toml", &text);
    let out = ha_node_check(&file, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("redundancy.renew_interval"),
        "{}",
        stderr(&out)
    );

    let out = ha_node_check(&file, &[("HA_REDUNDANCY__TTL", "10s")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The environment wins over the file in the other direction too.
    let ok = write(
        &dir,
        "ok.toml",
        &text.replace("ttl = \"500ms\"", "ttl = \"10s\""),
    );
    assert_eq!(ha_node_check(&ok, &[]).status.code(), Some(0));
    let out = ha_node_check(&ok, &[("HA_REDUNDANCY__TTL", "500ms")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // An unknown nested key from the environment is refused like one in the file.
    let out = ha_node_check(&ok, &[("HA_REDUNDANCY__TTL_MS", "5")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("ttl_ms"), "{}", stderr(&out));
}

/// A `step_down` action from a file needs the node's elector, which exists only once the
/// node starts: the builder wires it to the elector the node will have.
#[tokio::test]
async fn a_step_down_action_from_a_file_builds_and_forces_a_re_election() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("up");
    std::fs::write(&marker, b"").unwrap();
    let text = format!(
        "
node_id = \"a\"
[redundancy]
store = \"memory\"
ttl = \"1s\"
retry = \"100ms\"
[[checks]]
name = \"api\"
kind = \"command\"
command = [\"test\", \"-e\", \"{}\"]
interval = \"100ms\"
timeout = \"100ms\"
failure_threshold = 1
[[failover.components]]
name = \"api\"
action = {{ kind = \"step_down\" }}
",
        marker.display()
    );
    let config = HaConfig::from_toml_str(&text, "step-down.toml").expect("valid");
    let node = config
        .into_builder()
        .await
        .expect("a step_down action is supported")
        .build()
        .expect("builds");
    let mut events = node.bus().subscribe();
    node.start().await.expect("starts");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let token = loop {
        if let Some(lead) = node.is_leader() {
            break lead.token;
        }
        assert!(tokio::time::Instant::now() < deadline, "never led");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    std::fs::remove_file(&marker).unwrap();
    let lost = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Ok(ha_core::HaEvent::LeadershipLost {
                token: lost,
                reason,
                ..
            }) = events.recv().await
            {
                break (lost, reason);
            }
        }
    })
    .await
    .expect("the failover stepped the leader down");
    assert_eq!(lost, (token, ha_core::LossReason::SteppedDown));
    node.shutdown().await;
}

#[test]
fn the_sentinel_keepalive_and_reconcile_intervals_parse() {
    let text = format!(
        "{BASE}\n[replication.sentinel]\nmaster = \"m\"\nsentinels = [\"127.0.0.1:26379\"]\n\
         keepalive = \"300ms\"\nreconcile = \"5s\"\n"
    );
    let config = HaConfig::from_toml_str(&text, "sentinel").expect("valid");
    let sentinel = config.replication.sentinel.expect("a sentinel section");
    assert_eq!(
        sentinel.keepalive,
        Some(std::time::Duration::from_millis(300))
    );
    assert_eq!(sentinel.reconcile, Some(std::time::Duration::from_secs(5)));
}

/// A node whose config names `etcd://` (every member of a real 3-member cluster) elects itself
/// on etcd.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_store_url_elects_on_a_real_cluster() {
    let cluster = ha_testkit::EtcdCluster::start()
        .await
        .expect("start an etcd cluster");
    let text = BASE.replace(
        "single_node = true",
        &format!(
            "store = \"{}\"\nttl = \"1s\"\nretry = \"100ms\"",
            cluster.url()
        ),
    );
    let config = HaConfig::from_toml_str(&text, "etcd.toml").expect("valid");
    let node = Box::pin(config.into_builder())
        .await
        .expect("connects to etcd")
        .build()
        .expect("builds");
    node.start().await.expect("starts");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.is_leader().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never led on etcd");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

/// The agent's `rejoin` section comes from TOML, with human durations, and its rules name
/// their dotted path when the node is built.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_agent_rejoin_section_parses_and_is_checked() {
    let agent = |rejoin: &str| {
        format!(
            "node_id = \"a\"\ncluster = \"pg\"\n[redundancy]\nstore = \"memory\"\n\
             [replication.agent.member]\nname = \"a\"\nurl = \"postgres://postgres@127.0.0.1:5/postgres\"\n\
             [replication.agent.settings.rejoin]\n{rejoin}"
        )
    };
    let text = agent(
        "enabled = true\ndata_dir = \"/var/lib/postgresql/15/main\"\n\
         start_command = [\"pg_ctlcluster\", \"15\", \"main\", \"start\"]\nrun_as = \"postgres\"\n\
         reclone = true\nprimary_start_timeout = \"1m\"\n",
    );
    let config = HaConfig::from_toml_str(&text, "test.toml").expect("a rejoin section parses");
    let rejoin = &config.replication.agent.as_ref().unwrap().settings.rejoin;
    assert!(rejoin.enabled && rejoin.reclone);
    assert_eq!(
        rejoin.primary_start_timeout,
        std::time::Duration::from_secs(60)
    );
    assert_eq!(rejoin.run_as.as_deref(), Some("postgres"));
    let _builder = config
        .into_builder()
        .await
        .expect("a valid rejoin section builds");

    let missing = agent("enabled = true\nstart_command = [\"true\"]\n");
    let config = HaConfig::from_toml_str(&missing, "test.toml").expect("parses");
    let err = config.into_builder().await.unwrap_err().to_string();
    assert!(err.contains("rejoin.data_dir"), "{err}");
}
