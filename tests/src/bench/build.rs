//! Building the binaries a benchmark measures: this checkout's, and a base
//! revision's in a checkout of its own.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The control-plane binary every benchmark measures.
pub(crate) const BINARY: &str = "weir-control-plane";

/// Where the running benchmark was built: `<target>/<profile>/deps/<bench>`.
#[derive(Debug)]
pub(crate) struct BuiltIn {
    pub target_dir: PathBuf,
    pub profile_dir: PathBuf,
    pub release: bool,
}

impl BuiltIn {
    pub fn current() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .with_context(|| format!("unexpected benchmark location {}", exe.display()))?;
        let target_dir = profile_dir
            .parent()
            .with_context(|| format!("unexpected benchmark location {}", exe.display()))?;
        Ok(Self {
            target_dir: target_dir.to_owned(),
            profile_dir: profile_dir.to_owned(),
            release: profile_dir.file_name().is_some_and(|n| n == "release"),
        })
    }
}

/// The root of this checkout (the workspace holding `tests/`).
pub(crate) fn checkout_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_owned)
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // The target dir is always given with --target-dir.
    command.env_remove("CARGO_TARGET_DIR");
    command
}

fn run(mut command: Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `cargo build --release --bins` for this checkout, into the target dir
/// of the running benchmark, so the binaries land next to it (where
/// `workspace_binary` looks). Without `--release` when the benchmark
/// itself is not a release build (then figures are not representative).
pub(crate) fn build_this(built: &BuiltIn) -> Result<()> {
    let mut command = cargo();
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(checkout_root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&built.target_dir)
        .arg("--bins");
    if built.release {
        command.arg("--release");
    }
    eprintln!("bench: building this checkout's binaries");
    run(command, "cargo build --bins (this checkout)")
}

/// `git` in this checkout.
fn git(args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(checkout_root())
        .args(args)
        .output()
        .context("cannot run git")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What this checkout is: the short commit, `+changes` when the work tree
/// differs from it.
pub(crate) fn describe_this() -> String {
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|_| "unknown".into());
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Ok(s) if !s.is_empty() => format!("{head}+changes"),
        _ => head,
    }
}

/// The base revision's `weir-control-plane`, built when missing or stale.
///
/// The revision gets its own checkout (`git worktree add --detach`) in
/// `<target>/bench-base/<commit>/src`, built with its own target dir
/// `<target>/bench-base/<commit>/target`: two checkouts of this workspace
/// must never share a target dir (cargo hashes workspace crates by their
/// path relative to the workspace root, so they would share build outputs).
/// Both are kept, so the next run reuses them; with `skip_build`, an
/// existing binary is used as it is.
///
/// Returns (the commit's short id, the binary).
pub(crate) fn build_base(
    built: &BuiltIn,
    rev: &str,
    skip_build: bool,
) -> Result<(String, PathBuf)> {
    let commit = git(&[
        "rev-parse",
        "--verify",
        "--quiet",
        &format!("{rev}^{{commit}}"),
    ])
    .with_context(|| format!("WEIR_BENCH_BASE={rev} is not a commit of this repository"))?;
    let short = git(&["rev-parse", "--short", &commit])?;
    let dir = built
        .target_dir
        .join("bench-base")
        .join(commit.get(..12).unwrap_or(&commit));
    let src = dir.join("src");
    let target = dir.join("target");
    let profile = if built.release { "release" } else { "debug" };
    let binary = target.join(profile).join(BINARY);
    if skip_build && binary.exists() {
        return Ok((short, binary));
    }
    if !src.join("Cargo.toml").exists() {
        if src.exists() {
            bail!(
                "{} exists but is not a checkout of {short}; remove it (and run `git worktree prune`)",
                src.display()
            );
        }
        eprintln!("bench: checking out {short} in {}", src.display());
        let src_arg = src.to_string_lossy().into_owned();
        git(&["worktree", "add", "--detach", &src_arg, &commit])?;
    }
    let mut command = cargo();
    command
        .current_dir(&src)
        .arg("build")
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .args(["-p", BINARY, "--bin", BINARY]);
    if built.release {
        command.arg("--release");
    }
    eprintln!(
        "bench: building {BINARY} at {short} (target dir {})",
        target.display()
    );
    run(command, &format!("cargo build of {BINARY} at {short}"))?;
    if !binary.exists() {
        bail!("{} not found after building {short}", binary.display());
    }
    Ok((short, binary))
}
