//! The tamper battery: every way of damaging a stored backup is an error from verify and from
//! restore, and restore never produces output for it.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ha_dr::{BackupId, Error, Manifest, Repository, RestoreTarget, SEGMENT_SIZE, Source};

const TAG: usize = 16;

struct Fixture {
    repo: Repository,
    dir: tempfile::TempDir,
    manifest: Manifest,
    data: Vec<u8>,
    manifest_bytes: Vec<u8>,
    header_len: usize,
}

impl Fixture {
    async fn new() -> Self {
        let (repo, dir) = common::repo(9);
        let src = dir.path().join("src.bin");
        // Incompressible: about 3.5 segments after zstd.
        fs::write(&src, common::noise(SEGMENT_SIZE as usize * 3 + 30_000, 3)).unwrap();
        let manifest = repo.backup(&Source::file(&src), &[]).await.unwrap();
        fs::create_dir(dir.path().join("out")).unwrap();
        let mut f = Self {
            data: Vec::new(),
            manifest_bytes: Vec::new(),
            header_len: 8 + 4 + 4 + 32 + 1 + 16 + 1 + manifest.id.as_str().len(),
            repo,
            dir,
            manifest,
        };
        f.data = fs::read(f.data_path(&f.manifest.id)).unwrap();
        f.manifest_bytes = fs::read(f.manifest_path(&f.manifest.id)).unwrap();
        assert_eq!(f.segments().len(), 4, "fixture spans four segments");
        f
    }

    fn data_path(&self, id: &BackupId) -> PathBuf {
        self.dir.path().join("store").join(format!("{id}.data"))
    }

    fn manifest_path(&self, id: &BackupId) -> PathBuf {
        self.dir.path().join("store").join(format!("{id}.manifest"))
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Byte ranges of the stored segments (ciphertext + tag).
    fn segments(&self) -> Vec<Range<usize>> {
        let full = SEGMENT_SIZE as usize + TAG;
        let mut out = Vec::new();
        let mut at = self.header_len;
        while at < self.data.len() {
            let end = (at + full).min(self.data.len());
            out.push(at..end);
            at = end;
        }
        out
    }

    /// Stores `data` as the backup's data, checks verify and restore both fail with an error
    /// and restore leaves nothing, then puts the original back.
    async fn expect_rejected(&self, case: &str, data: &[u8]) -> Error {
        fs::write(self.data_path(&self.manifest.id), data).unwrap();
        let err = self.rejected(case).await;
        fs::write(self.data_path(&self.manifest.id), &self.data).unwrap();
        err
    }

    async fn rejected(&self, case: &str) -> Error {
        let id = &self.manifest.id;
        let verify = self.repo.verify(id).await;
        assert!(verify.is_err(), "{case}: verify must fail");
        let target = self.out().join("restored");
        let err = self
            .repo
            .restore(id, &RestoreTarget::Path(target.clone()), false)
            .await
            .expect_err(case);
        assert!(!target.exists(), "{case}: restore produced output");
        assert_eq!(
            common::names(&self.out()),
            Vec::<String>::new(),
            "{case}: leftovers"
        );
        err
    }

    async fn still_good(&self) {
        self.repo.verify(&self.manifest.id).await.unwrap();
    }
}

fn assert_corrupt(case: &str, err: &Error) {
    assert!(err.is_corruption(), "{case}: {err}");
    assert!(!err.is_retryable(), "{case}");
}

#[tokio::test]
async fn every_flipped_header_byte_is_rejected() {
    let f = Fixture::new().await;
    for i in 0..f.header_len {
        let mut data = f.data.clone();
        data[i] ^= 0x01;
        let err = f.expect_rejected(&format!("header byte {i}"), &data).await;
        // The version and algorithm bytes say "unsupported"; the key id byte may name a key
        // we do not hold; everything else is corruption.
        assert!(
            err.is_corruption()
                || matches!(
                    err,
                    Error::UnsupportedFormat { .. } | Error::MissingKey { .. }
                ),
            "header byte {i}: {err}"
        );
    }
    f.still_good().await;
}

#[tokio::test]
async fn flipped_bits_in_any_segment_are_rejected() {
    let f = Fixture::new().await;
    for (n, seg) in f.segments().into_iter().enumerate() {
        for at in [seg.start, seg.start + 1000, seg.end - TAG - 1, seg.end - 1] {
            for bit in [0x01u8, 0x80] {
                let mut data = f.data.clone();
                data[at] ^= bit;
                let case = format!("segment {n} byte {at} bit {bit:#x}");
                assert_corrupt(&case, &f.expect_rejected(&case, &data).await);
            }
        }
    }
    f.still_good().await;
}

#[tokio::test]
async fn truncation_anywhere_is_rejected() {
    let f = Fixture::new().await;
    let mut cuts = vec![0, 5, f.header_len - 1, f.header_len, f.data.len() - 1];
    for seg in f.segments() {
        cuts.extend([
            seg.start,
            seg.start + 1,
            seg.start + 30_000,
            seg.end - TAG,
            seg.end - 1,
        ]);
    }
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts.into_iter().filter(|c| *c < f.data.len()) {
        let case = format!("truncated to {cut} of {}", f.data.len());
        assert_corrupt(&case, &f.expect_rejected(&case, &f.data[..cut]).await);
    }
    let mut longer = f.data.clone();
    longer.extend_from_slice(&[0u8; 17]);
    assert_corrupt(
        "trailing bytes",
        &f.expect_rejected("trailing bytes", &longer).await,
    );
    f.still_good().await;
}

#[tokio::test]
async fn reordered_dropped_and_duplicated_segments_are_rejected() {
    let f = Fixture::new().await;
    let segs = f.segments();
    let header = &f.data[..f.header_len];
    let seg = |i: usize| &f.data[segs[i].clone()];
    let cases: Vec<(&str, Vec<usize>)> = vec![
        ("swap 1 and 2", vec![0, 2, 1, 3]),
        ("swap 0 and 1", vec![1, 0, 2, 3]),
        ("drop 1", vec![0, 2, 3]),
        ("drop last", vec![0, 1, 2]),
        ("drop first", vec![1, 2, 3]),
        ("duplicate 0", vec![0, 0, 1, 2, 3]),
        ("last twice", vec![0, 1, 2, 3, 3]),
    ];
    for (case, order) in cases {
        let mut data = header.to_vec();
        for i in order {
            data.extend_from_slice(seg(i));
        }
        assert_corrupt(case, &f.expect_rejected(case, &data).await);
    }
    f.still_good().await;
}

#[tokio::test]
async fn segments_spliced_from_another_backup_are_rejected() {
    let f = Fixture::new().await;
    // Same source, same key: only the salt (so the data key) differs.
    let src = f.dir.path().join("src.bin");
    let other = f.repo.backup(&Source::file(&src), &[]).await.unwrap();
    let other_data = fs::read(f.data_path(&other.id)).unwrap();
    let other_header = 8 + 4 + 4 + 32 + 1 + 16 + 1 + other.id.as_str().len();
    for (n, seg) in f.segments().into_iter().enumerate() {
        let theirs = other_header + (seg.start - f.header_len);
        let mut data = f.data.clone();
        data[seg.clone()].copy_from_slice(&other_data[theirs..theirs + seg.len()]);
        let case = format!("segment {n} from another backup");
        assert_corrupt(&case, &f.expect_rejected(&case, &data).await);
    }
    // The other backup's whole data under this id: the header names the other id.
    let err = f.expect_rejected("other data", &other_data).await;
    assert!(err.to_string().contains(other.id.as_str()), "{err}");
    f.still_good().await;
}

#[tokio::test]
async fn every_flipped_manifest_byte_is_rejected() {
    let f = Fixture::new().await;
    let path = f.manifest_path(&f.manifest.id);
    for i in 0..f.manifest_bytes.len() {
        let mut bytes = f.manifest_bytes.clone();
        bytes[i] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = f.rejected(&format!("manifest byte {i}")).await;
        assert!(
            err.is_corruption()
                || matches!(
                    err,
                    Error::UnsupportedFormat { .. } | Error::MissingKey { .. }
                ),
            "manifest byte {i}: {err}"
        );
    }
    fs::write(&path, &f.manifest_bytes).unwrap();
    f.still_good().await;
}

#[tokio::test]
async fn a_wrong_key_or_a_renamed_backup_is_rejected() {
    let f = Fixture::new().await;
    // Wrong key: a clear error naming the key the backup needs.
    let other_keys = Repository::with_store(f.repo.store().clone(), common::ring(10));
    let err = other_keys.verify(&f.manifest.id).await.unwrap_err();
    assert!(matches!(err, Error::MissingKey { .. }), "{err}");
    assert!(
        err.to_string().contains(f.manifest.key_id.as_str()),
        "{err}"
    );
    let target = f.out().join("restored");
    assert!(
        other_keys
            .restore(&f.manifest.id, &RestoreTarget::Path(target.clone()), false)
            .await
            .is_err()
    );
    assert!(!target.exists());

    // The backup copied under another id: the manifest and the header name the original.
    let renamed = BackupId::parse("file-renamed").unwrap();
    fs::copy(f.data_path(&f.manifest.id), f.data_path(&renamed)).unwrap();
    fs::copy(f.manifest_path(&f.manifest.id), f.manifest_path(&renamed)).unwrap();
    let err = f.repo.verify(&renamed).await.unwrap_err();
    assert_corrupt("renamed", &err);
    assert!(err.to_string().contains(f.manifest.id.as_str()), "{err}");
    remove(&[f.data_path(&renamed), f.manifest_path(&renamed)]);
    f.still_good().await;
}

fn remove(paths: &[PathBuf]) {
    for p in paths {
        fs::remove_file(Path::new(p)).unwrap();
    }
}
