//! The reader, fuzzed as a property: arbitrary damage to a valid backup's data and manifest
//! (random bytes, truncation, appended bytes, byte flips anywhere) never panics verify or
//! restore, always ends in an error, and restore never leaves output. This stands in for a
//! cargo-fuzz target, which needs a nightly toolchain.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use ha_dr::{Manifest, Repository, RestoreTarget, Source};
use proptest::prelude::*;

struct Fixture {
    repo: Repository,
    dir: tempfile::TempDir,
    manifest: Manifest,
    data: Vec<u8>,
    manifest_bytes: Vec<u8>,
    runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn data_path(&self) -> PathBuf {
        let id = &self.manifest.id;
        self.dir.path().join("store").join(format!("{id}.data"))
    }

    fn manifest_path(&self) -> PathBuf {
        let id = &self.manifest.id;
        self.dir.path().join("store").join(format!("{id}.manifest"))
    }
}

/// Held while a test uses the fixture: the property test damages its files in place (and
/// restores them), so a test that reads them meanwhile would see the damage.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One directory backup of about three segments, made once per test process.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (repo, dir) = common::repo(5);
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/noise.bin"), common::noise(150_000, 7)).unwrap();
        fs::write(src.join("text.txt"), "some text\n".repeat(500)).unwrap();
        let manifest = runtime
            .block_on(repo.backup(&Source::dir(&src), &[]))
            .unwrap();
        fs::create_dir(dir.path().join("out")).unwrap();
        let mut f = Fixture {
            repo,
            dir,
            manifest,
            data: Vec::new(),
            manifest_bytes: Vec::new(),
            runtime,
        };
        f.data = fs::read(f.data_path()).unwrap();
        f.manifest_bytes = fs::read(f.manifest_path()).unwrap();
        f
    })
}

/// A way to damage one file's bytes.
#[derive(Clone, Debug)]
enum Damage {
    /// XOR these (position as a fraction of the length, non-zero mask) pairs in.
    Flips(Vec<(f64, u8)>),
    /// Keep this fraction of the bytes.
    Truncate(f64),
    /// Replace everything with these bytes.
    Random(Vec<u8>),
    /// Append these bytes.
    Append(Vec<u8>),
}

impl Damage {
    fn apply(&self, original: &[u8]) -> Vec<u8> {
        let mut bytes = original.to_vec();
        let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
        match self {
            Damage::Flips(flips) => {
                for (f, mask) in flips {
                    let i = at(*f, bytes.len());
                    bytes[i] ^= mask;
                }
            }
            Damage::Truncate(f) => bytes.truncate(at(*f, original.len())),
            Damage::Random(random) => bytes.clone_from(random),
            Damage::Append(extra) => bytes.extend_from_slice(extra),
        }
        bytes
    }
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => prop::collection::vec((0.0..1.0f64, 1..=255u8), 1..8).prop_map(Damage::Flips),
        2 => (0.0..1.0f64).prop_map(Damage::Truncate),
        1 => prop::collection::vec(any::<u8>(), 0..2048).prop_map(Damage::Random),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Append),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn damaged_backups_are_errors_never_output(
        data_damage in prop::option::of(damage()),
        manifest_damage in prop::option::of(damage()),
    ) {
        prop_assume!(data_damage.is_some() || manifest_damage.is_some());
        let _exclusive = exclusive();
        let f = fixture();
        let data = data_damage.as_ref().map_or_else(|| f.data.clone(), |d| d.apply(&f.data));
        let manifest = manifest_damage
            .as_ref()
            .map_or_else(|| f.manifest_bytes.clone(), |d| d.apply(&f.manifest_bytes));
        // Damage that leaves the same bytes, or only changes JSON whitespace in the
        // manifest's envelope (a space flipped to a tab, a trailing newline), is no damage.
        let significant = |b: &[u8]| -> Vec<u8> {
            b.iter().copied().filter(|c| !b" \t\r\n".contains(c)).collect()
        };
        prop_assume!(
            data != f.data || significant(&manifest) != significant(&f.manifest_bytes)
        );
        fs::write(f.data_path(), &data).unwrap();
        fs::write(f.manifest_path(), &manifest).unwrap();
        let id = &f.manifest.id;
        let target = f.dir.path().join("out").join("restored");
        let verify = f.runtime.block_on(f.repo.verify(id));
        let restore = f
            .runtime
            .block_on(f.repo.restore(id, &RestoreTarget::Path(target.clone()), false));
        let leftovers = common::names(&f.dir.path().join("out"));
        fs::write(f.data_path(), &f.data).unwrap();
        fs::write(f.manifest_path(), &f.manifest_bytes).unwrap();

        prop_assert!(verify.is_err(), "verify accepted damage");
        prop_assert!(restore.is_err(), "restore accepted damage");
        prop_assert!(!target.exists(), "restore produced output");
        prop_assert!(leftovers.is_empty(), "restore left {leftovers:?}");
    }
}

#[test]
fn the_undamaged_fixture_verifies() {
    let _exclusive = exclusive();
    let f = fixture();
    f.runtime.block_on(f.repo.verify(&f.manifest.id)).unwrap();
}
