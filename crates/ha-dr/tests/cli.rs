//! The `ha-dr` binary, run as a user would: exit statuses, one-line errors, and a backup
//! killed mid-way.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn ha_dr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ha-dr"))
        .args(args)
        .env_remove("HA_DR_KEY")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = ha_dr(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with status 1 and exactly one line on stderr; returns it.
fn fails(args: &[&str]) -> String {
    let out = ha_dr(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} must fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("ha-dr: "), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn keygen_backup_list_verify_restore_prune() {
    let dir = tempfile::tempdir().unwrap();
    let (store, key) = (dir.path().join("store"), dir.path().join("key"));
    let text = ok(&["keygen", "--out", s(&key)]);
    assert!(text.starts_with("key id "), "{text}");
    assert!(fails(&["keygen", "--out", s(&key)]).contains("must not exist"));

    let src = dir.path().join("src");
    common::sample_tree(&src);
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "remember\n").unwrap();
    let ids = ok(&[
        "backup",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--dir",
        s(&src),
        "--file",
        s(&file),
        "--tag",
        "manual",
    ]);
    let ids: Vec<&str> = ids.lines().collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids[0].starts_with("dir-") && ids[1].starts_with("file-"),
        "{ids:?}"
    );

    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["list", "--store", s(&store), "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    // Listing needs no key and shows the clear part only: tags are sealed.
    assert_eq!(listed[0]["kind"], "dir");
    assert!(listed[0]["tags"].is_null(), "{listed}");
    assert!(listed[0]["plaintext_sha256"].is_null(), "{listed}");
    assert!(ok(&["list", "--store", s(&store)]).contains(ids[0]));

    let verified = ok(&["verify", "--store", s(&store), "--key-file", s(&key)]);
    assert_eq!(
        verified.lines().filter(|l| l.starts_with("ok ")).count(),
        2,
        "{verified}"
    );
    let tested = ok(&[
        "verify",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--id",
        ids[0],
        "--restore-test",
    ]);
    assert!(tested.contains("measured RTO"), "{tested}");

    let out = dir.path().join("out");
    ok(&[
        "restore",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--id",
        ids[0],
        "--to",
        s(&out),
    ]);
    assert_eq!(common::describe_tree(&out), common::describe_tree(&src));
    let err = fails(&[
        "restore",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--id",
        ids[0],
        "--to",
        s(&out),
    ]);
    assert!(err.contains("refusing"), "{err}");

    // A wrong key names the key the backup needs.
    let other = dir.path().join("other-key");
    ok(&["keygen", "--out", s(&other)]);
    let err = fails(&[
        "verify",
        "--store",
        s(&store),
        "--key-file",
        s(&other),
        "--id",
        ids[1],
    ]);
    assert!(err.contains("not in the key ring"), "{err}");
    let err = fails(&["verify", "--store", s(&store), "--id", ids[1]]);
    assert!(err.contains("HA_DR_KEY"), "{err}");

    let dry = ok(&[
        "prune",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--keep-last",
        "1",
        "--dry-run",
    ]);
    assert!(dry.contains("keep   (newest, last)"), "{dry}");
    let err = fails(&["prune", "--store", s(&store)]);
    assert!(err.contains("keep"), "{err}");
}

#[test]
fn a_backup_killed_mid_way_leaves_no_visible_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (store, key) = (dir.path().join("store"), dir.path().join("key"));
    ok(&["keygen", "--out", s(&key)]);
    let file = dir.path().join("f");
    std::fs::write(&file, b"earlier").unwrap();
    let earlier = ok(&[
        "backup",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--file",
        s(&file),
    ]);

    let mut child = Command::new(env!("CARGO_BIN_EXE_ha-dr"))
        .args([
            "backup",
            "--store",
            s(&store),
            "--key-file",
            s(&key),
            "--file",
            "/dev/stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Pipe writes block until the child reads: once 16 MiB went in, it is mid-backup.
    for chunk in 0..16 {
        stdin.write_all(&common::noise(1 << 20, chunk)).unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);

    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["list", "--store", s(&store), "--json"])).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "only the earlier backup"
    );
    let leftovers: Vec<String> = common::names(&store)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "the killed write left its temp file: {leftovers:?}"
    );
    // The store is not corrupt: the earlier backup verifies, and cleanup takes the leftover.
    ok(&[
        "verify",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--id",
        earlier.trim(),
    ]);
    let store_handle = ha_dr::LocalStore::open(&store).unwrap();
    let removed = ha_dr::BackupStore::cleanup(&store_handle, std::time::Duration::ZERO).unwrap();
    assert_eq!(removed, leftovers);
}

/// A progress bar is drawn only for a terminal: under a pseudo-terminal (`script`, from
/// util-linux, which every Debian has) stderr shows it; piped, stderr stays empty.
#[test]
fn progress_bar_only_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (store, key, file) = (
        dir.path().join("store"),
        dir.path().join("key"),
        dir.path().join("data.bin"),
    );
    ok(&["keygen", "--out", s(&key)]);
    std::fs::write(&file, vec![7u8; 4 << 20]).unwrap();
    let backup = [
        "backup",
        "--store",
        s(&store),
        "--key-file",
        s(&key),
        "--file",
        s(&file),
    ];

    let piped = ha_dr(&backup);
    assert!(piped.status.success());
    assert!(
        piped.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );

    let line = std::iter::once(env!("CARGO_BIN_EXE_ha-dr"))
        .chain(backup)
        .collect::<Vec<_>>()
        .join(" ");
    let tty = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env_remove("HA_DR_KEY")
        .stdin(Stdio::null())
        .output()
        .expect("`script` (util-linux) runs the CLI under a pseudo-terminal");
    assert!(tty.status.success(), "{tty:?}");
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(
        shown.contains("backing up"),
        "no progress bar on a terminal: {shown:?}"
    );
}

/// Finding 9: `verify` of every backup counts a manifest that does not parse as a failure
/// (named, exit 1); an empty store is not "verified".
#[test]
fn verify_of_every_backup_fails_on_a_broken_manifest_and_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, key) = (dir.path().join("store"), dir.path().join("key"));
    ok(&["keygen", "--out", s(&key)]);
    let err = fails(&["verify", "--store", s(&store), "--key-file", s(&key)]);
    assert!(err.contains("no backups"), "{err}");
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "remember\n").unwrap();
    let backup = |path: &Path| {
        ok(&[
            "backup",
            "--store",
            s(&store),
            "--key-file",
            s(&key),
            "--file",
            s(path),
        ])
        .trim()
        .to_owned()
    };
    let good = backup(&file);
    let broken = backup(&file);
    assert_ne!(good, broken);
    std::fs::write(store.join(format!("{broken}.manifest")), b"{ not json").unwrap();
    let out = ha_dr(&["verify", "--store", s(&store), "--key-file", s(&key)]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stdout.contains(&format!("ok {good}")), "{stdout}");
    assert!(stdout.contains(&format!("FAILED {broken}")), "{stdout}");
    assert!(stderr.contains("1 of 2 backups failed"), "{stderr}");
}
