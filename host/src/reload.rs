//! When to reload the configuration: a change in the folders of the `-f` files and folders
//! (inotify, through `notify`: editors that write a temporary file and rename it, and
//! Kubernetes ConfigMap updates, which swap a symlink, both show there), or SIGHUP. Every
//! trigger is only a hint: the reload reads the files again and applies what differs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long to wait after a change for the writes that follow it (one edit often makes several
/// events).
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches configuration paths; dropping it stops watching.
pub struct Triggers {
    _watcher: Option<notify::RecommendedWatcher>,
    rx: mpsc::UnboundedReceiver<()>,
}

/// The folders to watch for `paths`: a file's folder, a folder itself.
fn folders(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            }
        })
        .collect()
}

impl Triggers {
    /// Watches the folders of `paths` and SIGHUP. A folder that cannot be watched is logged
    /// (SIGHUP still works).
    pub fn start(paths: &[PathBuf]) -> Triggers {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = tx.clone();
        let watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            // Only changes: reading the files (as the reload itself does) is not one.
            if let Ok(e) = e
                && matches!(
                    e.kind,
                    notify::EventKind::Create(_)
                        | notify::EventKind::Modify(_)
                        | notify::EventKind::Remove(_)
                )
            {
                let _ = events.send(());
            }
        });
        let watcher = match watcher {
            Ok(mut w) => {
                for dir in folders(paths) {
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(folder = %dir.display(), "Cannot watch the configuration folder ({e}); send SIGHUP to reload");
                    }
                }
                Some(w)
            }
            Err(e) => {
                tracing::warn!("Cannot watch configuration files ({e}); send SIGHUP to reload");
                None
            }
        };
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::hangup()) {
                Ok(mut hup) => {
                    tokio::spawn(async move {
                        while hup.recv().await.is_some() {
                            if tx.send(()).is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!("Cannot handle SIGHUP: {e}"),
            }
        }
        Triggers {
            _watcher: watcher,
            rx,
        }
    }

    /// The next reload request (several close together count as one).
    pub async fn next(&mut self) -> Option<()> {
        self.rx.recv().await?;
        tokio::time::sleep(DEBOUNCE).await;
        while self.rx.try_recv().is_ok() {}
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_watched_through_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.yaml");
        let got = folders(&[file, dir.path().to_path_buf(), PathBuf::from("x.yaml")]);
        let want: BTreeSet<PathBuf> = [PathBuf::from("."), dir.path().to_path_buf()].into();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn reading_the_files_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut t = Triggers::start(std::slice::from_ref(&file));
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            std::fs::read_to_string(&file).unwrap();
        }
        let got = tokio::time::timeout(Duration::from_millis(800), t.next()).await;
        assert!(got.is_err(), "no reload for reads");
    }

    #[tokio::test]
    async fn a_renamed_file_in_a_watched_folder_triggers_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut t = Triggers::start(std::slice::from_ref(&file));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // As an editor saves: a temporary file renamed over the original.
        std::fs::write(dir.path().join(".bridge.yaml.swp"), "b").unwrap();
        std::fs::rename(dir.path().join(".bridge.yaml.swp"), &file).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), t.next()).await;
        assert_eq!(got, Ok(Some(())));
    }
}
