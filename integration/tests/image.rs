//! The container images `integration/build-image.sh` builds, checked the way a cluster would use
//! them: the entrypoint runs from the image's own filesystem (which is FROM scratch, so a missing
//! library or loader shows here), as the image's user, which is not root, and the image stays
//! under 40 MiB.
//!
//! Containers cannot be run on these machines (the sandbox refuses podman's rlimits and cgroups),
//! so the test mounts the image (`buildah from` + `buildah mount`) and runs its entrypoint with
//! `chroot --userspec`. It uses the binaries the test command already built (the test profile,
//! stripped) instead of a release build, which takes 10+ minutes on two cores: the image's
//! contents are the same apart from optimisation, and a stripped debug sidecar is the larger of
//! the two, so the size bound holds a fortiori for release.
//!
//! Needs buildah (run-tests.sh installs it) and root, as CI has; without them the test fails
//! saying so rather than skipping.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration::harness::sidecar_binary;

const MAX_IMAGE_BYTES: u64 = 40 * 1024 * 1024;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration crate sits in the workspace")
        .to_path_buf()
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A working container of an image, mounted; unmounted and removed when dropped.
struct Mounted {
    container: String,
    root: PathBuf,
}

impl Mounted {
    fn new(image: &str) -> Mounted {
        let container = stdout(&run(Command::new("buildah").args([
            "from",
            "--pull-never",
            image,
        ])));
        let root = PathBuf::from(stdout(&run(
            Command::new("buildah").args(["mount", container.as_str()])
        )));
        Mounted { container, root }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("buildah")
            .args(["umount", self.container.as_str()])
            .output();
        let _ = Command::new("buildah")
            .args(["rm", self.container.as_str()])
            .output();
    }
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read a directory of the image") {
                pending.push(entry.expect("list the image").path());
            }
        } else {
            total += metadata.len();
        }
    }
    total
}

#[test]
fn images_run_their_entrypoint_as_non_root_and_stay_small() {
    let binary = sidecar_binary();
    assert_eq!(
        effective_uid(),
        0,
        "this test mounts images with buildah and chroots into them, which needs root (CI runs as root)"
    );
    let buildah = Command::new("buildah").arg("--version").output();
    assert!(
        buildah.as_ref().is_ok_and(|o| o.status.success()),
        "buildah is not installed: integration/run-tests.sh installs it (apt-get install buildah); {buildah:?}"
    );
    let profile = binary
        .parent()
        .and_then(Path::file_name)
        .and_then(|name| name.to_str())
        .expect("the binary sits in target/<profile>")
        .to_string();
    let version = stdout(&run(Command::new(&binary).arg("--version")));

    let built = run(
        Command::new(repo_root().join("integration/build-image.sh")).args([
            "--profile",
            profile.as_str(),
            "--no-build",
        ]),
    );
    let images: Vec<(String, String)> = stdout(&built)
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("image ")?.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect();
    let names: Vec<&str> = images.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["locality-sidecar", "echo-server"], "{built:?}");
    let sidecar_version = version
        .strip_prefix("locality-sidecar ")
        .expect("--version prints the name and version");
    // build-image.sh tags a debug build apart from the release image.
    let suffix = if profile == "release" { "" } else { "-debug" };
    assert_eq!(
        images[0].1,
        format!("localhost/locality-sidecar:{sidecar_version}{suffix}")
    );

    for (name, image) in &images {
        let inspected = stdout(&run(Command::new("buildah").args([
            "inspect",
            "--type",
            "image",
            image.as_str(),
        ])));
        let inspected: serde_json::Value = serde_json::from_str(&inspected)
            .unwrap_or_else(|e| panic!("{image}: buildah inspect: {e}"));
        let config = &inspected["OCIv1"]["config"];
        let user = config["User"].as_str().unwrap_or_default().to_string();
        let entrypoint: Vec<String> = serde_json::from_value(config["Entrypoint"].clone())
            .unwrap_or_else(|e| panic!("{image}: entrypoint {}: {e}", config["Entrypoint"]));
        let uid = user.split(':').next().unwrap_or_default();
        assert!(
            uid.parse::<u32>().is_ok_and(|uid| uid != 0),
            "{image}: USER is {user:?}, expected a numeric non-root user"
        );

        let mounted = Mounted::new(image);
        let passwd = std::fs::read_to_string(mounted.root.join("etc/passwd"))
            .unwrap_or_else(|e| panic!("{image}: no /etc/passwd: {e}"));
        assert!(
            passwd
                .lines()
                .any(|line| line.split(':').nth(2) == Some(uid)),
            "{image}: /etc/passwd has no user {uid}:\n{passwd}"
        );
        let bytes = tree_bytes(&mounted.root);
        eprintln!("{image}: {bytes} bytes, user {user}, entrypoint {entrypoint:?}");
        assert!(
            bytes < MAX_IMAGE_BYTES,
            "{image} holds {bytes} bytes, over the 40 MiB bound"
        );

        let ran = run(Command::new("chroot")
            .arg(format!("--userspec={user}"))
            .arg(&mounted.root)
            .args(&entrypoint)
            .arg("--version"));
        assert_eq!(
            stdout(&ran),
            format!("{name} {sidecar_version}"),
            "{image}: the entrypoint's --version"
        );
    }
}

/// The effective user id, from /proc (no libc call, no unsafe).
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .expect("an effective uid in /proc/self/status")
}
