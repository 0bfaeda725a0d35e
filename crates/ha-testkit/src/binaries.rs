//! Finding server binaries, with an error that says how to install a missing one.

use std::path::{Path, PathBuf};

use crate::error::{Result, TestkitError};

/// Finds `name` on `PATH` or in `extra_dirs`, else fails naming the Debian package.
pub fn find(name: &str, extra_dirs: &[PathBuf], package: &str) -> Result<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = extra_dirs.to_vec();
    dirs.extend(std::env::split_paths(&path_var));
    for dir in &dirs {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(TestkitError::MissingBinary {
        binary: name.to_owned(),
        looked_in: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":"),
        install_hint: format!("apt-get install -y {package}"),
    })
}

/// Debian's `libfaketime` preload library, which [`PostgresServerBuilder::fake_clock`]
/// loads into the postmaster so a test can step its wall clock while it runs.
///
/// `HA_LIBFAKETIME` wins when set.
///
/// [`PostgresServerBuilder::fake_clock`]: crate::PostgresServerBuilder::fake_clock
pub fn libfaketime() -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("HA_LIBFAKETIME") {
        Some(path) => vec![PathBuf::from(path)],
        None => [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/faketime/libfaketime.so.1",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
    };
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| TestkitError::MissingBinary {
            binary: "libfaketime.so.1".to_owned(),
            looked_in: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
            install_hint: "apt-get install -y libfaketime".to_owned(),
        })
}

/// The directory holding PostgreSQL's server binaries (`initdb`, `postgres`, `pg_basebackup`).
///
/// `HA_PG_BIN` wins when set; otherwise the newest `/usr/lib/postgresql/<major>/bin` (Debian's
/// layout, where these binaries are not on `PATH`); otherwise `PATH`.
pub fn postgres_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HA_PG_BIN") {
        let dir = PathBuf::from(dir);
        return find("initdb", std::slice::from_ref(&dir), "postgresql")
            .map(|_| dir)
            .map_err(|mut e| {
                if let TestkitError::MissingBinary { looked_in, .. } = &mut e {
                    *looked_in = format!("HA_PG_BIN={looked_in}");
                }
                e
            });
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    let extra: Vec<PathBuf> = versions.into_iter().rev().map(|(_, dir)| dir).collect();
    let initdb = find("initdb", &extra, "postgresql")?;
    Ok(initdb
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/")))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_binary_and_package() {
        let err = find("ha-no-such-binary", &[], "ha-pkg").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("ha-no-such-binary"), "{text}");
        assert!(text.contains("apt-get install -y ha-pkg"), "{text}");
    }

    #[test]
    fn finds_sh_on_path() {
        assert!(find("sh", &[], "dash").is_ok());
    }
}
