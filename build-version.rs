//! Build script of every crate that ships a binary (`build =
//! "../build-version.rs"`): sets `WEFT_VERSION` to `<version> (commit
//! <hash>)` for `--version`.
//!
//! The commit comes from `WEFT_GIT_COMMIT` when set (a build from a source
//! tarball), else from the repository's files (`.git/HEAD` and the ref it
//! names; no `git` binary needed), else `unknown`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=WEFT_GIT_COMMIT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = env::var("WEFT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().to_string())
        .or_else(|| git_commit(&manifest))
        .unwrap_or_else(|| "unknown".into());
    // `<hash>` or `<hash>-dirty` (scripts/package marks a changed tree).
    let (hash, rest) = commit.split_at(commit.find('-').unwrap_or(commit.len()));
    let short = format!("{}{rest}", &hash[..hash.len().min(12)]);
    println!(
        "cargo:rustc-env=WEFT_VERSION={} (commit {short})",
        env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
}

/// The commit `HEAD` names, read from the files under `.git`.
fn git_commit(start: &Path) -> Option<String> {
    // The crate's directory or the workspace's, never a repository around
    // an unpacked source tree.
    let dot_git = start
        .ancestors()
        .take(2)
        .map(|d| d.join(".git"))
        .find(|p| p.exists())?;
    // A worktree or submodule has a `.git` file pointing at its git dir.
    let git_dir = if dot_git.is_file() {
        let text = fs::read_to_string(&dot_git).ok()?;
        let target = text.trim().strip_prefix("gitdir:")?.trim();
        dot_git.parent()?.join(target)
    } else {
        dot_git
    };
    let head_file = git_dir.join("HEAD");
    watch(&head_file);
    let head = fs::read_to_string(&head_file).ok()?;
    let head = head.trim();
    let Some(name) = head.strip_prefix("ref: ") else {
        return is_hash(head).then(|| head.to_string());
    };
    // Refs live in the common dir (the main repository for a worktree).
    let common = fs::read_to_string(git_dir.join("commondir"))
        .map(|c| git_dir.join(c.trim()))
        .unwrap_or(git_dir);
    let loose = common.join(name);
    // Watch the ref's directory: a commit rewrites the loose ref or creates
    // it (when the ref was only packed before).
    if let Some(dir) = loose.parent() {
        watch(dir);
    }
    let packed = common.join("packed-refs");
    watch(&packed);
    if let Ok(hash) = fs::read_to_string(&loose) {
        let hash = hash.trim();
        return is_hash(hash).then(|| hash.to_string());
    }
    fs::read_to_string(packed)
        .ok()?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, r)| *r == name)
        .map(|(hash, _)| hash.to_string())
        .filter(|h| is_hash(h))
}

/// Rebuild when `path` changes. Only paths that exist: cargo takes a missing
/// one as changed, and would rebuild on every build.
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn is_hash(s: &str) -> bool {
    s.len() >= 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}
