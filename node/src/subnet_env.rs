//! Reading and writing `subnet.env` (the format is `weft_config::SubnetEnv`).

use std::io::Write;
use std::path::Path;
pub use weft_config::SubnetEnv;
use weft_lease::SubnetKey;

/// The subnet(s) the file names, to ask for the same lease again.
pub fn key(env: &SubnetEnv) -> Option<SubnetKey> {
    let (v4, v6) = env.subnets();
    SubnetKey::new(v4, v6).ok()
}

/// Reads the file; `Ok(None)` if it does not exist.
pub fn read(path: &Path) -> Result<Option<SubnetEnv>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => SubnetEnv::parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the file atomically: readers see the old or the new file, never
/// half of one (temporary file in the same directory, fsync, rename).
pub fn write(env: &SubnetEnv, path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("subnet.env"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(env.render().as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_config::NetworkConfig;

    #[test]
    fn atomic_write_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/weft/subnet.env");
        assert_eq!(read(&path).unwrap(), None);
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let env = SubnetEnv::new(
            &cfg,
            Some("10.244.9.0/24".parse().unwrap()),
            None,
            1500,
            false,
        );
        write(&env, &path).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back, env);
        assert_eq!(key(&back).unwrap().to_string(), "10.244.9.0-24");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
    }
}
