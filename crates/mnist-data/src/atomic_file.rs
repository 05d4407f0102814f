//! Atomic file writes: write a temporary file beside the target, then rename it into place.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{DataError, IdxError};

/// Writes `path` through `write`, so that a crash or error leaves the old file or none, never a
/// partly written one: the temporary file is removed on error and renamed over `path` on success.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut File) -> Result<(), IdxError>,
) -> Result<(), DataError> {
    let at_path = |e| DataError::in_file(path, IdxError::Io(e));
    // The temporary file must be in the target's directory: rename is atomic only within one
    // file system.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    // A temporary file is private to its owner; the file it becomes is for everyone to read.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut temp = builder.tempfile_in(dir).map_err(at_path)?;
    write(temp.as_file_mut()).map_err(|e| DataError::in_file(path, e))?;
    temp.as_file_mut()
        .flush()
        .and_then(|()| temp.as_file().sync_all())
        .map_err(at_path)?;
    temp.persist(path).map_err(|e| at_path(e.error))?;
    Ok(())
}
