//! The agents' file source: one directory of YAML files shared by every node's agent (each
//! agent picks its own Node object by name), written the way tools that edit such a directory
//! safely do: whole files, atomically.

use std::{
    fs,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

use crate::temp_dir::TempDir;

static NEXT_TMP: AtomicU32 = AtomicU32::new(0);

/// Replaces `path` with `contents` atomically: written to a temporary name in the same
/// directory, then renamed over it. A watcher never reads a half-written file; the temporary
/// name ends in `.tmp`, which the agent's file source ignores.
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let parent = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let file_name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    let tmp = parent.join(format!(
        ".{file_name}.{}-{}.tmp",
        std::process::id(),
        NEXT_TMP.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("cannot rename {} to {}", tmp.display(), path.display())
    })
}

/// A temporary source directory, removed on drop.
#[derive(Debug)]
pub struct SourceDir {
    dir: TempDir,
}

impl SourceDir {
    pub fn new() -> Result<Self> {
        Ok(Self {
            dir: TempDir::new("s")?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates or replaces `file` (e.g. `services.yaml`) atomically.
    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        write_atomically(&self.path().join(file), yaml)
    }

    pub fn remove(&self, file: &str) -> Result<()> {
        let path = self.path().join(file);
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporaries() {
        let source = SourceDir::new().unwrap();
        source.write("a.yaml", "first").unwrap();
        source.write("a.yaml", "second").unwrap();
        assert_eq!(
            fs::read_to_string(source.path().join("a.yaml")).unwrap(),
            "second"
        );
        let names: Vec<_> = fs::read_dir(source.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.yaml"]);
        source.remove("a.yaml").unwrap();
        let path = source.path().to_owned();
        drop(source);
        assert!(!path.exists());
    }
}
