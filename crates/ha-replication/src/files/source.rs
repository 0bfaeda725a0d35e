//! Listing the source tree: `lstat` only, links read but never followed, and every entry the
//! replicator will not copy (special files, links leaving the tree, unrepresentable names)
//! set aside with its reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::FileSyncError;
use super::report::{Failure, RefusalReason, Refused};
use super::target::{self, FileAttrs, Mtime, RESERVED_PREFIX, SpecialKind};

/// Most links followed while resolving one link, as Linux's `MAXSYMLINKS`.
const MAX_LINK_DEPTH: usize = 40;

/// A regular file of the source, with its identity so that a copy can notice the file was
/// replaced between the listing and the open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceFile {
    pub(crate) size: u64,
    pub(crate) mtime: Mtime,
    pub(crate) mode: u32,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl SourceFile {
    pub(crate) fn attrs(&self) -> FileAttrs {
        FileAttrs {
            mode: self.mode,
            mtime: self.mtime,
        }
    }
}

/// An entry the replicator syncs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SourceEntry {
    File(SourceFile),
    Dir(FileAttrs),
    Symlink(String),
}

/// The source tree as one run sees it.
#[derive(Debug, Default)]
pub(crate) struct SourceListing {
    /// The root's attributes.
    pub(crate) root: Option<FileAttrs>,
    /// Entries to sync, by relative path (the root is not among them).
    pub(crate) entries: BTreeMap<String, SourceEntry>,
    /// Entries not synced on purpose.
    pub(crate) refused: Vec<Refused>,
    /// Paths of refused or unreadable entries: whatever the target has there is kept.
    pub(crate) kept: BTreeSet<String>,
    /// Entries or directories that could not be read: the listing is incomplete.
    pub(crate) errors: Vec<Failure>,
}

/// Lists the tree under `root`. Fails only when the root itself cannot be read; anything
/// below that goes wrong is recorded in [`SourceListing::errors`].
pub(crate) fn list_source(root: &Path) -> Result<SourceListing, FileSyncError> {
    let unavailable = |source| FileSyncError::SourceUnavailable {
        path: root.to_path_buf(),
        source,
    };
    // The root may itself be a link (a configured path); nothing below it is followed.
    let metadata = fs::metadata(root).map_err(unavailable)?;
    if !metadata.is_dir() {
        return Err(unavailable(io::Error::new(
            io::ErrorKind::NotADirectory,
            "the source root is not a directory",
        )));
    }
    let mut listing = SourceListing {
        root: Some(dir_attrs(&metadata)),
        ..SourceListing::default()
    };
    let mut dirs: Vec<(String, PathBuf)> = vec![(String::new(), root.to_path_buf())];
    while let Some((dir, abs)) = dirs.pop() {
        let read = match fs::read_dir(&abs) {
            Ok(read) => read,
            Err(e) if dir.is_empty() => return Err(unavailable(e)),
            // Removed since its parent was listed: it is simply gone.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                listing.unreadable(&dir, FileSyncError::io("list directory", abs, e));
                continue;
            }
        };
        for entry in read {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    listing.unreadable(&dir, FileSyncError::io("list directory", &abs, e));
                    break;
                }
            };
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                let lossy = target::join(&dir, &file_name.to_string_lossy());
                listing.refuse(lossy, RefusalReason::NameNotUtf8, false);
                continue;
            };
            let rel = target::join(&dir, name);
            if name.starts_with(RESERVED_PREFIX) {
                listing.refuse(rel, RefusalReason::ReservedName, false);
                continue;
            }
            let path = entry.path();
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    listing.unreadable(&rel, FileSyncError::io("stat", path, e));
                    continue;
                }
            };
            let file_type = metadata.file_type();
            if file_type.is_file() {
                let file = SourceFile {
                    size: metadata.len(),
                    mtime: Mtime::of(&metadata),
                    mode: metadata.mode() & 0o7777,
                    dev: metadata.dev(),
                    ino: metadata.ino(),
                };
                listing.entries.insert(rel, SourceEntry::File(file));
            } else if file_type.is_dir() {
                listing
                    .entries
                    .insert(rel.clone(), SourceEntry::Dir(dir_attrs(&metadata)));
                dirs.push((rel, path));
            } else if file_type.is_symlink() {
                match fs::read_link(&path) {
                    Ok(text) => match text.into_os_string().into_string() {
                        Ok(text) => {
                            listing.entries.insert(rel, SourceEntry::Symlink(text));
                        }
                        Err(_) => listing.refuse(rel, RefusalReason::SymlinkNotUtf8, true),
                    },
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => listing.unreadable(&rel, FileSyncError::io("read link", path, e)),
                }
            } else {
                let kind = SpecialKind::of(&metadata);
                listing.refuse(rel, RefusalReason::Special { kind }, true);
            }
        }
    }
    listing.refuse_escaping_links();
    listing.refused.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(listing)
}

fn dir_attrs(metadata: &Metadata) -> FileAttrs {
    FileAttrs {
        mode: metadata.mode() & 0o7777,
        mtime: Mtime::of(metadata),
    }
}

impl SourceListing {
    /// Sets `path` aside with `reason`; `keep` protects the target's entry at that path.
    fn refuse(&mut self, path: String, reason: RefusalReason, keep: bool) {
        tracing::warn!(path, ?reason, "source entry not synced");
        if keep {
            self.kept.insert(path.clone());
        }
        self.refused.push(Refused { path, reason });
    }

    fn unreadable(&mut self, path: &str, error: FileSyncError) {
        tracing::warn!(path, error = %error, "source listing incomplete");
        self.kept.insert(path.to_owned());
        self.errors.push(Failure::new(path, &error));
    }

    /// Refuses every link that, once on the target, would point outside the target root.
    fn refuse_escaping_links(&mut self) {
        let links: HashMap<&str, &str> = self
            .entries
            .iter()
            .filter_map(|(path, entry)| match entry {
                SourceEntry::Symlink(text) => Some((path.as_str(), text.as_str())),
                _ => None,
            })
            .collect();
        let mut bad = Vec::new();
        for (&path, &text) in &links {
            if let Err(reason) = check_link(path, text, &links) {
                bad.push((path.to_owned(), reason));
            }
        }
        for (path, reason) in bad {
            self.entries.remove(&path);
            self.refuse(path, reason, true);
        }
    }
}

/// Whether the link at `path` holding `text` stays inside the tree, resolving it by name
/// through the other links of the tree (`links`), as the kernel would on the target: a link
/// `a/up -> ..` is fine, but `a/b -> up/../..` climbs out through it.
pub(crate) fn check_link<'a>(
    path: &'a str,
    text: &'a str,
    links: &HashMap<&str, &'a str>,
) -> Result<(), RefusalReason> {
    let mut stack: Vec<&str> = target::parent(path)
        .split('/')
        .filter(|c| !c.is_empty())
        .collect();
    let mut depth = 0;
    resolve(&mut stack, text, text, links, &mut depth)
}

fn resolve<'a>(
    stack: &mut Vec<&'a str>,
    text: &'a str,
    original: &str,
    links: &HashMap<&str, &'a str>,
    depth: &mut usize,
) -> Result<(), RefusalReason> {
    if text.starts_with('/') {
        return Err(RefusalReason::SymlinkAbsolute {
            target: original.to_owned(),
        });
    }
    for component in text.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err(RefusalReason::SymlinkEscapes {
                        target: original.to_owned(),
                    });
                }
            }
            name => {
                stack.push(name);
                if let Some(&next) = links.get(stack.join("/").as_str()) {
                    *depth += 1;
                    if *depth > MAX_LINK_DEPTH {
                        return Err(RefusalReason::SymlinkLoop {
                            target: original.to_owned(),
                        });
                    }
                    stack.pop();
                    // An absolute link further on is refused on its own; through it, this
                    // one leaves the tree too.
                    resolve(stack, next, original, links, depth).map_err(|e| match e {
                        RefusalReason::SymlinkAbsolute { target } => {
                            RefusalReason::SymlinkEscapes { target }
                        }
                        other => other,
                    })?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str, text: &str, links: &[(&str, &str)]) -> Result<(), RefusalReason> {
        let mut map: HashMap<&str, &str> = links.iter().copied().collect();
        map.insert(path, text);
        check_link(path, text, &map)
    }

    #[test]
    fn links_inside_the_tree_pass() {
        assert!(check("a", "b", &[]).is_ok());
        assert!(check("a", ".", &[]).is_ok());
        assert!(check("d/a", "..", &[]).is_ok());
        assert!(check("d/e/a", "../../x/./y", &[]).is_ok());
        assert!(check("d/a", "../d/../d/b", &[]).is_ok());
        assert!(check("d/a", "missing/dangling", &[]).is_ok());
    }

    #[test]
    fn links_leaving_the_tree_are_refused() {
        assert!(matches!(
            check("a", "/etc/passwd", &[]),
            Err(RefusalReason::SymlinkAbsolute { .. })
        ));
        assert!(matches!(
            check("a", "..", &[]),
            Err(RefusalReason::SymlinkEscapes { .. })
        ));
        assert!(matches!(
            check("d/a", "../../x", &[]),
            Err(RefusalReason::SymlinkEscapes { .. })
        ));
        // Lexically inside, but `up` is the root, so `up/..` is its parent.
        assert!(matches!(
            check("d/b", "up/../x", &[("d/up", "..")]),
            Err(RefusalReason::SymlinkEscapes { .. })
        ));
        // Through a link that is absolute.
        assert!(matches!(
            check("b", "abs/x", &[("abs", "/tmp")]),
            Err(RefusalReason::SymlinkEscapes { .. })
        ));
        assert!(matches!(
            check("a", "b/x", &[("b", "a")]),
            Err(RefusalReason::SymlinkLoop { .. })
        ));
    }
}
