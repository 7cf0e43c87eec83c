//! A tmpfs for tests of full and read-only partitions, shared by the workspace's test crates
//! (`#[path]`-included by tests/e2e.rs and edits/tests/hostile_api.rs).

use std::path::PathBuf;
use std::process::Command;

/// A tmpfs mounted on `dir` (created) for as long as it lives, unmounted on drop (also when the
/// test fails), or `None`, with a "skipped" line, where this process may not mount (not root).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: PathBuf, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "skipped: cannot mount a tmpfs on {} (not root?)",
                dir.display()
            );
            return None;
        }
        Some(Tmpfs(dir))
    }

    pub fn remount_ro(&self) {
        let st = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount {} read-only", self.0.display());
    }

    /// Fills the file system (a file `fill`) until no byte is left.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("fill")).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        while f.write_all(&[0u8; 1]).is_ok() {}
    }

    /// Fills the file system, then frees `pages` 4 KiB pages of `fill` again.
    #[allow(dead_code)]
    pub fn fill_leaving(&self, pages: u64) {
        self.fill();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.0.join("fill"))
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(pages * 4096)).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
