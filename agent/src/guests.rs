//! Running guests: one `hvnode-vmm` process each, in its own process group so that it outlives
//! the agent, with its files under `<run>/vms/<name>/`.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hvnode_api::guest::{GuestSpec, GuestState};
use hvnode_api::vmm::{VmConfig, VmDisk};

/// A guest's VMM process.
#[derive(Debug, Clone)]
pub struct Running {
    /// VMM pid.
    pub pid: u32,
    /// When it started.
    pub started: Instant,
}

/// What the agent knows about guest processes.
#[derive(Debug)]
pub struct Guests {
    running: Mutex<HashMap<String, Running>>,
    crashed: Mutex<HashMap<String, String>>,
    events: Arc<crate::events::EventLog>,
}

/// Errors starting a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A path does not name an existing file inside the image directory.
    #[error("{0} {1:?} is not an existing file inside the image directory {2}: upload it first")]
    Path(&'static str, String, String),
    /// Spawning or preparing the VMM failed.
    #[error("Starting the VMM: {0}")]
    Spawn(String),
}

/// Resolves a spec path against the image directory, refusing anything outside it (symlinks
/// included).
pub fn resolve(images: &Path, what: &'static str, rel: &str) -> Result<PathBuf, GuestError> {
    let err = || GuestError::Path(what, rel.to_owned(), images.display().to_string());
    hvnode_api::guest::validate_image_path(rel).map_err(|_| err())?;
    let root = images.canonicalize().map_err(|_| err())?;
    let full = root.join(rel).canonicalize().map_err(|_| err())?;
    if !full.starts_with(&root) || !full.is_file() {
        return Err(err());
    }
    Ok(full)
}

impl Guests {
    /// No guests yet; state changes go to `events`.
    pub fn new(events: Arc<crate::events::EventLog>) -> Self {
        Guests {
            running: Mutex::new(HashMap::new()),
            crashed: Mutex::new(HashMap::new()),
            events,
        }
    }

    /// The state and pid of a guest.
    pub fn state(&self, name: &str) -> (GuestState, Option<u32>, Option<u64>) {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return (
                GuestState::Running,
                Some(r.pid),
                Some(r.started.elapsed().as_secs()),
            );
        }
        if self
            .crashed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
        {
            return (GuestState::Crashed, None, None);
        }
        (GuestState::Stopped, None, None)
    }

    /// Number of running guests.
    pub fn running_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Starts the VMM for `spec`; a task watches it and restarts it when the guest reboots.
    pub fn start(
        self: &Arc<Self>,
        spec: &GuestSpec,
        images: &Path,
        run_dir: &Path,
        vmm: &Path,
    ) -> Result<u32, GuestError> {
        let dir = run_dir.join("vms").join(&spec.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| GuestError::Spawn(format!("{}: {e}", dir.display())))?;
        let path_str = |p: PathBuf| p.to_string_lossy().into_owned();
        let disks = spec
            .disks
            .iter()
            .map(|d| {
                Ok(VmDisk {
                    path: path_str(resolve(images, "disk", &d.path)?),
                    read_only: d.read_only,
                })
            })
            .collect::<Result<Vec<_>, GuestError>>()?;
        let config = VmConfig {
            name: spec.name.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: path_str(resolve(images, "kernel", &spec.kernel)?),
            initrd: spec
                .initrd
                .as_deref()
                .map(|i| resolve(images, "initrd", i).map(path_str))
                .transpose()?,
            cmdline: spec.cmdline.clone(),
            disks,
            nets: Vec::new(),
            rng: spec.rng,
            serial_log: Some(path_str(dir.join("console.log"))),
            serial_socket: Some(path_str(dir.join("console.sock"))),
            control_socket: Some(path_str(dir.join("control.sock"))),
            exit_file: Some(path_str(dir.join("exit.json"))),
        };
        if !spec.nics.is_empty() {
            return Err(GuestError::Spawn(
                "guest NICs need the VMM's virtio-net, which is not implemented yet: remove `nics`"
                    .into(),
            ));
        }
        let cfg_path = dir.join("vm.json");
        let json =
            serde_json::to_vec_pretty(&config).map_err(|e| GuestError::Spawn(e.to_string()))?;
        crate::store::write_atomic(&cfg_path, &json, 0o600)
            .map_err(|e| GuestError::Spawn(e.to_string()))?;
        let _ = std::fs::remove_file(dir.join("console.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("vmm.log"))
            .map_err(|e| GuestError::Spawn(e.to_string()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| GuestError::Spawn(e.to_string()))?;
        // Its own process group: signals to the agent's group do not reach it, and it outlives
        // an agent restart; its output goes to a file, never a pipe to the agent.
        let mut child = Command::new(vmm)
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| GuestError::Spawn(format!("{}: {e}", vmm.display())))?;
        let pid = child.id();
        let _ = std::fs::write(dir.join("pid"), pid.to_string());
        self.crashed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&spec.name);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                spec.name.clone(),
                Running {
                    pid,
                    started: Instant::now(),
                },
            );
        eprintln!("agent: guest {} started (vmm pid {pid})", spec.name);
        self.events.emit("guest_state", Some(&spec.name), "running");
        let me = Arc::clone(self);
        let (spec, images, run_dir, vmm) = (
            spec.clone(),
            images.to_owned(),
            run_dir.to_owned(),
            vmm.to_owned(),
        );
        std::thread::spawn(move || {
            let code = child.wait().ok().and_then(|s| s.code());
            me.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&spec.name);
            let _ = std::fs::remove_file(dir.join("pid"));
            match code {
                Some(0) => {
                    eprintln!("agent: guest {} stopped", spec.name);
                    me.events.emit("guest_state", Some(&spec.name), "stopped");
                }
                Some(3) => {
                    eprintln!("agent: guest {} rebooted; starting it again", spec.name);
                    me.events.emit("guest_state", Some(&spec.name), "rebooting");
                    if let Err(e) = me.start(&spec, &images, &run_dir, &vmm) {
                        eprintln!("agent: guest {}: {e}", spec.name);
                    }
                }
                other => {
                    let tail = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
                    let last = tail.lines().last().unwrap_or("").to_owned();
                    eprintln!("agent: guest {} crashed ({other:?}): {last}", spec.name);
                    me.events
                        .emit("guest_state", Some(&spec.name), format!("crashed: {last}"));
                    me.crashed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(spec.name.clone(), last);
                }
            }
        });
        Ok(pid)
    }

    /// Asks the VMM to stop the guest at once; kills it if it does not answer.
    pub fn stop(&self, name: &str, run_dir: &Path) -> bool {
        let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
        else {
            return false;
        };
        let sock = run_dir.join("vms").join(name).join("control.sock");
        let asked = std::os::unix::net::UnixStream::connect(&sock)
            .and_then(|mut s| std::io::Write::write_all(&mut s, b"{\"op\":\"stop\"}\n"))
            .is_ok();
        if !asked {
            if let Ok(pid) = i32::try_from(r.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_refuses_escapes_and_missing_files() {
        let root = std::env::temp_dir().join(format!("hvnode-agent-img-{}", std::process::id()));
        let images = root.join("images");
        std::fs::create_dir_all(images.join("k")).unwrap();
        std::fs::write(images.join("k/vmlinuz"), b"x").unwrap();
        std::fs::write(root.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("secret"), images.join("link")).unwrap();
        assert!(resolve(&images, "kernel", "k/vmlinuz").is_ok());
        for bad in ["../secret", "link", "k/missing", "/etc/passwd", "k"] {
            assert!(resolve(&images, "kernel", bad).is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
