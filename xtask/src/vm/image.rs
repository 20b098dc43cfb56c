//! An initramfs image: the guest's files gathered by path (host files with the symlinks met on
//! the way, or bytes made here), written as an uncompressed cpio "newc" archive.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufWriter, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, Result, ensure};

/// An initramfs being assembled: guest path (relative, no leading `/`) -> what goes there.
/// Written sorted, so that every directory comes before what it holds.
#[derive(Default)]
pub(super) struct Image {
    entries: BTreeMap<String, Entry>,
}

enum Entry {
    Dir,
    Symlink(String),
    File { source: PathBuf, mode: u32 },
    Data { bytes: Vec<u8>, mode: u32 },
}

fn rel(guest: &str) -> String {
    guest.trim_start_matches('/').to_owned()
}

impl Image {
    fn parents(&mut self, guest: &str) {
        let mut path = String::new();
        let rel = rel(guest);
        let mut parts: Vec<&str> = rel.split('/').collect();
        parts.pop();
        for part in parts {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            self.entries.entry(path.clone()).or_insert(Entry::Dir);
        }
    }

    /// Whether something is at `guest` already.
    pub(super) fn contains(&self, guest: &str) -> bool {
        self.entries.contains_key(&rel(guest))
    }

    pub(super) fn dir(&mut self, guest: &str) {
        self.parents(guest);
        self.entries.entry(rel(guest)).or_insert(Entry::Dir);
    }

    pub(super) fn symlink(&mut self, guest: &str, target: &str) {
        self.parents(guest);
        self.entries
            .insert(rel(guest), Entry::Symlink(target.to_owned()));
    }

    pub(super) fn file_from(&mut self, guest: &str, source: &Path, mode: u32) {
        self.parents(guest);
        self.entries.insert(
            rel(guest),
            Entry::File {
                source: source.to_owned(),
                mode,
            },
        );
    }

    pub(super) fn data(&mut self, guest: &str, bytes: Vec<u8>, mode: u32) {
        self.parents(guest);
        self.entries.insert(rel(guest), Entry::Data { bytes, mode });
    }

    /// Adds the host file at `path` at the same place in the guest, with every symlink met on
    /// the way (merged /usr, library version links), so that the same path resolves the same
    /// way inside.
    pub(super) fn add_host(&mut self, path: &Path) -> Result<()> {
        self.add_host_depth(path, 0)
    }

    fn add_host_depth(&mut self, path: &Path, depth: u32) -> Result<()> {
        ensure!(depth < 16, "too many symlinks resolving {}", path.display());
        let components: Vec<Component> = path.components().collect();
        ensure!(
            components.first() == Some(&Component::RootDir),
            "{} is not absolute",
            path.display()
        );
        let mut current = PathBuf::from("/");
        for (i, component) in components.iter().enumerate().skip(1) {
            let next = current.join(component);
            let meta = fs::symlink_metadata(&next)
                .with_context(|| format!("cannot stat {}", next.display()))?;
            let guest = next.to_str().context("non-UTF-8 path")?.to_owned();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&next)?;
                self.symlink(&guest, target.to_str().context("non-UTF-8 link")?);
                let resolved = normalize(&current.join(&target));
                let rest: PathBuf = components[i + 1..].iter().collect();
                return self.add_host_depth(&resolved.join(rest), depth + 1);
            }
            if meta.is_dir() {
                self.dir(&guest);
            } else {
                ensure!(
                    i == components.len() - 1,
                    "{} is not a directory",
                    next.display()
                );
                self.file_from(&guest, &next, meta.permissions().mode() & 0o7777);
            }
            current = next;
        }
        Ok(())
    }

    /// Adds a host file or a directory with everything under it.
    pub(super) fn add_host_tree(&mut self, path: &Path) -> Result<()> {
        self.add_host(path)?;
        if fs::symlink_metadata(path)?.is_dir() {
            for entry in fs::read_dir(path)? {
                self.add_host_tree(&entry?.path())?;
            }
        }
        Ok(())
    }

    /// Writes the archive (cpio "newc", uncompressed); returns its size.
    pub(super) fn write(&self, path: &Path) -> Result<u64> {
        let file =
            fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = Cpio {
            out: BufWriter::with_capacity(1 << 20, file),
            written: 0,
            ino: 1,
        };
        for (name, entry) in &self.entries {
            if name.is_empty() {
                continue;
            }
            match entry {
                Entry::Dir => out.entry(name, 0o040_755, &[])?,
                Entry::Symlink(target) => out.entry(name, 0o120_777, target.as_bytes())?,
                Entry::Data { bytes, mode } => out.entry(name, 0o100_000 | mode, bytes)?,
                Entry::File { source, mode } => {
                    let bytes = fs::read(source)
                        .with_context(|| format!("cannot read {}", source.display()))?;
                    out.entry(name, 0o100_000 | mode, &bytes)?;
                }
            }
        }
        out.entry("TRAILER!!!", 0, &[])?;
        out.out.flush()?;
        Ok(out.written)
    }
}

/// Resolves `.` and `..` lexically (the path's directories hold no symlinks: callers resolve
/// them first).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(c) => out.push(c),
            _ => {}
        }
    }
    out
}

struct Cpio<W: std::io::Write> {
    out: W,
    written: u64,
    ino: u32,
}

impl<W: std::io::Write> Cpio<W> {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + name.len() + 1) as u64;
        self.pad()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    fn pad(&mut self) -> Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.out.write_all(&[0; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_parent_components() {
        assert_eq!(
            normalize(Path::new("/usr/lib/../lib64/x")),
            Path::new("/usr/lib64/x")
        );
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut out = Cpio {
            out: Vec::new(),
            written: 0,
            ino: 1,
        };
        out.entry("a", 0o100_644, b"xyz").unwrap();
        out.entry("TRAILER!!!", 0, &[]).unwrap();
        assert_eq!(out.out.len() % 4, 0);
        assert_eq!(out.written as usize, out.out.len());
        assert!(out.out.starts_with(b"070701"));
    }
}
