//! `node.toml`, the node's saved configuration: one owner, so that two changes (a host name and
//! a network confirmation at the same moment) never read the same old file and each write the
//! other's change away.

use std::path::PathBuf;
use std::sync::Mutex;

use hvnode_api::config::NodeConfig;

use crate::error::Error;

/// The node configuration file.
#[derive(Debug)]
pub struct NodeConfigFile {
    path: PathBuf,
    /// Held across every read-modify-write.
    lock: Mutex<()>,
}

impl NodeConfigFile {
    /// The file at `path` (it may not exist yet: defaults).
    pub fn new(path: PathBuf) -> Self {
        NodeConfigFile {
            path,
            lock: Mutex::new(()),
        }
    }

    fn read_unlocked(&self) -> Result<NodeConfig, Error> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                NodeConfig::from_toml(&text).map_err(|e| Error::internal("node.toml is invalid", e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeConfig::default()),
            Err(e) => Err(Error::internal("Reading node.toml", e)),
        }
    }

    /// The saved configuration.
    pub fn read(&self) -> Result<NodeConfig, Error> {
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.read_unlocked()
    }

    /// Changes the saved configuration with `change` and writes it back atomically, all under
    /// the file's lock. Returns the configuration written.
    pub fn update(&self, change: impl FnOnce(&mut NodeConfig)) -> Result<NodeConfig, Error> {
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut config = self.read_unlocked()?;
        change(&mut config);
        hvnode_base::fs::write_atomic(&self.path, config.to_toml().as_bytes(), 0o644)
            .map_err(|e| Error::internal("Saving node.toml", e))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_updates_of_different_fields_both_survive() {
        let dir = std::env::temp_dir().join(format!("hvnode-nodeconfig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = std::sync::Arc::new(NodeConfigFile::new(dir.join("node.toml")));
        let mut threads = Vec::new();
        for i in 0..20u16 {
            let file = std::sync::Arc::clone(&file);
            threads.push(std::thread::spawn(move || {
                file.update(|c| {
                    if i % 2 == 0 {
                        c.hostname = Some(format!("node-{i}"));
                    } else {
                        c.network
                            .dns
                            .push(std::net::IpAddr::from([192, 0, 2, i as u8]));
                    }
                })
                .unwrap();
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let saved = file.read().unwrap();
        assert!(saved.hostname.is_some());
        assert_eq!(
            saved.network.dns.len(),
            10,
            "a DNS change was lost: {saved:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
