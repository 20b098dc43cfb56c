//! A directory under the system's temporary directory, uniquely named per bed (its name starts
//! with the bed prefix `lbt`), removed with its contents on drop.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::netns::unique_prefix;

#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new, empty directory named after `unique_prefix(tag)`.
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(unique_prefix(tag));
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("testbed: cannot remove {}: {e}", self.path.display());
        }
    }
}
