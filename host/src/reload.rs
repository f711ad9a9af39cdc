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
    /// A request was seen: report it at this instant (the end of its debounce).
    due: Option<tokio::time::Instant>,
}

/// The folders to watch for `paths`: a file's folder, a folder itself, made absolute (a
/// watch on `.` misses in-place writes of the files in it).
fn folders(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    paths
        .iter()
        .map(|p| {
            let dir = if p.is_dir() {
                p.clone()
            } else {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            };
            std::path::absolute(&dir).unwrap_or(dir)
        })
        .collect()
}

/// Whether a change to `path` may change the configuration: a YAML file, or a Kubernetes
/// ConfigMap volume's `..data` link and `..<timestamp>` folders, which its updates swap.
/// Anything else in the folder (a log file written there, an editor's swap file) is not.
fn relevant(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("..")
        || matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        )
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
                && e.paths.iter().any(|p| relevant(p))
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
            due: None,
        }
    }

    /// The next reload request (several within [`DEBOUNCE`] count as one). Cancel-safe: the
    /// run loop selects over it beside a ticker, and a request seen before a cancellation is
    /// kept (its deadline lives in `self`, not in the dropped future).
    pub async fn next(&mut self) -> Option<()> {
        loop {
            match self.due {
                None => {
                    self.rx.recv().await?;
                    self.due = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {
                            while self.rx.try_recv().is_ok() {}
                            self.due = None;
                            return Some(());
                        }
                        more = self.rx.recv() => {
                            more?;
                        }
                    }
                }
            }
        }
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
        let cwd = std::env::current_dir().unwrap();
        let want: BTreeSet<PathBuf> = [cwd, dir.path().to_path_buf()].into();
        assert_eq!(got, want);
    }

    #[test]
    fn only_yaml_and_configmap_swaps_are_relevant() {
        assert!(relevant(Path::new("/c/bridge.yaml")));
        assert!(relevant(Path::new("/c/x.yml")));
        assert!(relevant(Path::new("/c/..data")));
        assert!(relevant(Path::new("/c/..2026_11_30_06_00_00.123")));
        assert!(!relevant(Path::new("/c/bridge.log")));
        assert!(!relevant(Path::new("/c/.bridge.yaml.swp")));
    }

    #[tokio::test]
    async fn writing_another_file_in_the_folder_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut t = Triggers::start(std::slice::from_ref(&file));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The bridge's own log, written beside its configuration.
        for i in 0..3 {
            std::fs::write(dir.path().join("bridge.log"), format!("line {i}")).unwrap();
        }
        let got = tokio::time::timeout(Duration::from_millis(800), t.next()).await;
        assert!(got.is_err(), "no reload for a log file");
    }

    /// A Kubernetes ConfigMap volume: `bridge.yaml -> ..data/bridge.yaml`, `..data ->
    /// ..<timestamp>`; an update writes a new timestamped folder and renames a new `..data`
    /// link over the old one (the kubelet's atomic writer). The file itself never changes.
    #[tokio::test]
    async fn a_configmap_update_triggers_a_reload() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..2026_11_30_a")).unwrap();
        std::fs::write(d.join("..2026_11_30_a/bridge.yaml"), "a").unwrap();
        symlink("..2026_11_30_a", d.join("..data")).unwrap();
        symlink("..data/bridge.yaml", d.join("bridge.yaml")).unwrap();
        let mut t = Triggers::start(&[d.join("bridge.yaml")]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::create_dir(d.join("..2026_11_30_b")).unwrap();
        std::fs::write(d.join("..2026_11_30_b/bridge.yaml"), "b").unwrap();
        symlink("..2026_11_30_b", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), t.next()).await;
        assert!(got.is_ok(), "the swap triggers a reload");
        assert_eq!(std::fs::read_to_string(d.join("bridge.yaml")).unwrap(), "b");
    }

    #[tokio::test]
    async fn an_edit_in_place_triggers_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut t = Triggers::start(std::slice::from_ref(&file));
        tokio::time::sleep(Duration::from_millis(100)).await;
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(b"b").unwrap();
        drop(f);
        let got = tokio::time::timeout(Duration::from_secs(5), t.next()).await;
        assert!(got.is_ok(), "an append triggers a reload");
    }

    /// The run loop's select drops `next()` whenever its ticker fires; a request seen by a
    /// dropped `next()` still comes out of the following one.
    #[tokio::test]
    async fn a_request_survives_a_cancelled_wait() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut t = Triggers::start(std::slice::from_ref(&file));
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(&file, "b").unwrap();
        // Cancelled while debouncing.
        let early = tokio::time::timeout(Duration::from_millis(150), t.next()).await;
        assert!(early.is_err(), "still debouncing");
        let got = tokio::time::timeout(Duration::from_secs(2), t.next()).await;
        assert!(got.is_ok(), "the request was kept");
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
