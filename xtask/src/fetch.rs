//! `cargo xtask fetch-data`: download the dataset files from the first mirror that has them,
//! verify the SHA-256 of their decompressed bytes, and only then move them into place.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flate2::read::MultiGzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

/// Environment variable naming a mirror to try before the public ones.
pub const MIRROR_VAR: &str = "MNIST_MIRROR";

/// The public mirrors PyTorch's torchvision downloads MNIST from, in its order.
pub const PUBLIC_MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// A dataset file and the SHA-256 of its decompressed bytes, which stay the same whichever way
/// a mirror compressed it.
#[derive(Clone, Copy, Debug)]
pub struct ExpectedFile {
    /// Canonical name without `.gz`.
    pub name: &'static str,
    /// Lowercase hex SHA-256 of the decompressed file.
    pub sha256: &'static str,
}

/// MNIST's four files and their canonical hashes.
pub const MNIST_FILES: [ExpectedFile; 4] = [
    ExpectedFile {
        name: "train-images-idx3-ubyte",
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    ExpectedFile {
        name: "train-labels-idx1-ubyte",
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    ExpectedFile {
        name: "t10k-images-idx3-ubyte",
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    ExpectedFile {
        name: "t10k-labels-idx1-ubyte",
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

/// Arguments of `cargo xtask fetch-data`.
#[derive(clap::Args)]
pub struct FetchArgs {
    /// A mirror to try first: an http(s) URL or a local directory holding the .gz files.
    /// Repeatable; tried in order, before $MNIST_MIRROR and the public mirrors.
    #[arg(long = "mirror", value_name = "URL or DIR")]
    mirrors: Vec<String>,
    /// Where to store the files.
    #[arg(long, value_name = "DIR", default_value_os_t = default_data_dir())]
    dir: PathBuf,
}

/// `<workspace>/data/mnist`, wherever cargo was run from.
fn default_data_dir() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).join("data/mnist")
}

/// Runs `fetch-data`.
pub fn run(args: FetchArgs) -> Result<()> {
    let mirrors = mirror_order(&args.mirrors, std::env::var(MIRROR_VAR).ok().as_deref());
    let dir = args.dir;
    let fetched = fetch_files(&MNIST_FILES, &mirrors, &dir)?;
    let dir = dir.canonicalize().unwrap_or(dir);
    if fetched == 0 {
        println!(
            "Nothing to do: all {} files are present and verified in {}.",
            MNIST_FILES.len(),
            dir.display()
        );
    } else {
        println!(
            "Fetched {fetched} file(s); all {} verified in {}.",
            MNIST_FILES.len(),
            dir.display()
        );
    }
    Ok(())
}

/// Where a dataset can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mirror {
    /// A base URL ending in `/`.
    Http(String),
    /// A local directory holding the files.
    Dir(PathBuf),
}

impl Mirror {
    /// An `http://` or `https://` URL, a `file://` URL, or else a directory path.
    pub fn parse(spec: &str) -> Mirror {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let base = if spec.ends_with('/') {
                spec.to_string()
            } else {
                format!("{spec}/")
            };
            Mirror::Http(base)
        } else {
            Mirror::Dir(PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec)))
        }
    }
}

impl fmt::Display for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mirror::Http(url) => f.write_str(url),
            Mirror::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// `--mirror`s first, then `$MNIST_MIRROR`, then the public mirrors.
pub fn mirror_order(flags: &[String], env: Option<&str>) -> Vec<Mirror> {
    flags
        .iter()
        .map(String::as_str)
        .chain(env.filter(|s| !s.trim().is_empty()))
        .chain(PUBLIC_MIRRORS)
        .map(Mirror::parse)
        .collect()
}

/// Makes sure every file is in `dir` and verified; returns how many had to be fetched.
pub fn fetch_files(files: &[ExpectedFile], mirrors: &[Mirror], dir: &Path) -> Result<usize> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let agent = http_agent();
    let mut fetched = 0;
    for file in files {
        if let Some(path) = verified_copy(file, dir)? {
            println!("{}: present and verified ({})", file.name, path.display());
            continue;
        }
        fetch_file(file, mirrors, dir, &agent)?;
        fetched += 1;
    }
    Ok(fetched)
}

/// The file's verified copy in `dir`, if there is one; a copy that fails verification is removed,
/// so it can neither shadow a good download nor be mistaken for one.
fn verified_copy(file: &ExpectedFile, dir: &Path) -> Result<Option<PathBuf>> {
    for name in [format!("{}.gz", file.name), file.name.to_string()] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        match decompressed_sha256(&path) {
            Ok(actual) if actual == file.sha256 => return Ok(Some(path)),
            Ok(actual) => eprintln!(
                "{}: SHA-256 {actual} does not match the expected {}; removing it and fetching again",
                path.display(),
                file.sha256
            ),
            Err(e) => eprintln!("{}: {e:#}; removing it and fetching again", path.display()),
        }
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(None)
}

/// Fetches one file from the first mirror that serves it, verifies it, and moves it into place.
fn fetch_file(
    file: &ExpectedFile,
    mirrors: &[Mirror],
    dir: &Path,
    agent: &ureq::Agent,
) -> Result<()> {
    let mut failures = Vec::new();
    for mirror in mirrors {
        // Beside the destination, so the final rename is atomic; deleted on drop unless persisted.
        let prefix = format!(".{}.", file.name);
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".part");
        // A temporary file is private to its owner; a data file is for everyone to read.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let mut temp = builder
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        let stored_name = match download(mirror, file.name, &mut temp, agent) {
            Ok(name) => name,
            Err(e) => {
                failures.push(format!("{mirror}: {e:#}"));
                continue;
            }
        };
        let actual = decompressed_sha256(temp.path()).with_context(|| {
            format!("{stored_name} from {mirror} is corrupt; the download was deleted")
        })?;
        if actual != file.sha256 {
            bail!(
                "{stored_name} from {mirror} failed verification: the SHA-256 of its decompressed \
                 bytes is {actual}, expected {}; the download was deleted",
                file.sha256
            );
        }
        let path = dir.join(&stored_name);
        temp.persist(&path)
            .with_context(|| format!("cannot move the download to {}", path.display()))?;
        println!("{}: fetched from {mirror} and verified", file.name);
        return Ok(());
    }
    bail!(
        "could not fetch {} from any mirror:\n  - {}\n\
         Without internet access, point at a mirror: `cargo xtask fetch-data --mirror <URL or \
         directory>` (a directory holding the four .gz files works), or set {MIRROR_VAR}.",
        file.name,
        failures.join("\n  - ")
    )
}

/// Copies `name` (as `.gz`, else raw) from the mirror into `out`; returns the name it had.
fn download(
    mirror: &Mirror,
    name: &str,
    out: &mut NamedTempFile,
    agent: &ureq::Agent,
) -> Result<String> {
    match mirror {
        Mirror::Dir(dir) => {
            if !dir.is_dir() {
                bail!("no such directory");
            }
            let (stored_name, path) = [format!("{name}.gz"), name.to_string()]
                .into_iter()
                .map(|n| (n.clone(), dir.join(n)))
                .find(|(_, path)| path.is_file())
                .with_context(|| format!("has neither {name}.gz nor {name}"))?;
            let source =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let len = source.metadata().map(|m| m.len()).ok();
            copy_with_progress(source, len, out, &stored_name)
                .with_context(|| format!("cannot copy {}", path.display()))?;
            Ok(stored_name)
        }
        Mirror::Http(base) => {
            let stored_name = format!("{name}.gz");
            let url = format!("{base}{stored_name}");
            let response = agent
                .get(&url)
                .call()
                .with_context(|| format!("GET {url}"))?;
            let len = response.body().content_length();
            let body = response.into_body().into_reader();
            copy_with_progress(body, len, out, &stored_name)
                .with_context(|| format!("downloading {url}"))?;
            Ok(stored_name)
        }
    }
}

/// Copies `source` into `out` behind a progress bar (drawn only when stderr is a terminal).
fn copy_with_progress(
    source: impl Read,
    len: Option<u64>,
    out: &mut NamedTempFile,
    label: &str,
) -> io::Result<()> {
    let bar = match len {
        Some(len) => ProgressBar::new(len),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:26} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    io::copy(&mut bar.wrap_read(source), out.as_file_mut())?;
    out.as_file_mut().flush()?;
    out.as_file().sync_all()?;
    bar.finish_and_clear();
    Ok(())
}

/// Lowercase hex SHA-256 of a file's decompressed bytes (the file itself when it is not gzip).
pub fn decompressed_sha256(path: &Path) -> Result<String> {
    let mut file = BufReader::new(
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let gzipped = file.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> = if gzipped {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).context(if gzipped {
                    "corrupt gzip data"
                } else {
                    "read error"
                });
            }
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// An HTTP client that gives up quickly when there is no network, yet lets a slow download run.
fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(10)))
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("mnist-cnn-xtask/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    /// A dataset of two small files and the hashes of their bytes, served from a directory.
    struct FakeMirror {
        dir: tempfile::TempDir,
        files: Vec<ExpectedFile>,
        contents: Vec<Vec<u8>>,
    }

    fn sha256_hex(bytes: &[u8]) -> &'static str {
        let hex: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Box::leak(hex.into_boxed_str())
    }

    fn fake_mirror() -> FakeMirror {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, mut contents) = (Vec::new(), Vec::new());
        for (name, len) in [("alpha-idx1-ubyte", 5000), ("beta-idx1-ubyte", 300)] {
            let content: Vec<u8> = (0..len).map(|i: u32| (i * 7 % 251) as u8).collect();
            let mut gz = GzEncoder::new(Vec::new(), Compression::default());
            gz.write_all(&content).unwrap();
            fs::write(dir.path().join(format!("{name}.gz")), gz.finish().unwrap()).unwrap();
            files.push(ExpectedFile {
                name,
                sha256: sha256_hex(&content),
            });
            contents.push(content);
        }
        FakeMirror {
            dir,
            files,
            contents,
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn fetches_from_a_directory_mirror_then_does_nothing() {
        let mirror = fake_mirror();
        let dest = tempfile::tempdir().unwrap();
        let mirrors = [Mirror::parse(mirror.dir.path().to_str().unwrap())];
        assert_eq!(
            fetch_files(&mirror.files, &mirrors, dest.path()).unwrap(),
            2
        );
        assert_eq!(
            entries(dest.path()),
            ["alpha-idx1-ubyte.gz", "beta-idx1-ubyte.gz"]
        );
        assert_eq!(
            fetch_files(&mirror.files, &mirrors, dest.path()).unwrap(),
            0
        );
    }

    #[test]
    fn a_flipped_byte_is_rejected_and_leaves_nothing_behind() {
        let mirror = fake_mirror();
        let path = mirror.dir.path().join("alpha-idx1-ubyte.gz");
        let mut bytes = fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        fs::write(&path, bytes).unwrap();

        let dest = tempfile::tempdir().unwrap();
        let mirrors = [Mirror::parse(mirror.dir.path().to_str().unwrap())];
        let message = format!(
            "{:#}",
            fetch_files(&mirror.files, &mirrors, dest.path()).unwrap_err()
        );
        assert!(message.contains("alpha-idx1-ubyte.gz"), "{message}");
        assert!(message.contains("deleted"), "{message}");
        assert!(
            entries(dest.path()).is_empty(),
            "{:?}",
            entries(dest.path())
        );
    }

    #[test]
    fn a_wrong_hash_names_the_file_and_both_hashes() {
        let mut mirror = fake_mirror();
        mirror.files[1].sha256 = "00".repeat(32).leak();
        let dest = tempfile::tempdir().unwrap();
        let mirrors = [Mirror::parse(mirror.dir.path().to_str().unwrap())];
        let message = format!(
            "{:#}",
            fetch_files(&mirror.files, &mirrors, dest.path()).unwrap_err()
        );
        assert!(message.contains("beta-idx1-ubyte.gz"), "{message}");
        assert!(message.contains(&"00".repeat(32)), "{message}");
        let actual = sha256_hex(&mirror.contents[1]);
        assert!(message.contains(actual), "{message}");
        // The first file was verified and kept; the bad one left nothing.
        assert_eq!(entries(dest.path()), ["alpha-idx1-ubyte.gz"]);
    }

    #[test]
    fn a_corrupt_local_copy_is_replaced() {
        let mirror = fake_mirror();
        let dest = tempfile::tempdir().unwrap();
        fs::write(dest.path().join("alpha-idx1-ubyte"), b"not the data").unwrap();
        let mirrors = [Mirror::parse(mirror.dir.path().to_str().unwrap())];
        assert_eq!(
            fetch_files(&mirror.files, &mirrors, dest.path()).unwrap(),
            2
        );
        assert_eq!(
            entries(dest.path()),
            ["alpha-idx1-ubyte.gz", "beta-idx1-ubyte.gz"]
        );
    }

    #[test]
    fn unreachable_mirrors_fail_fast_listing_each_and_explaining_mirror() {
        // A port that was just free: connecting is refused at once, as with no network.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mirror = fake_mirror();
        let dest = tempfile::tempdir().unwrap();
        let mirrors = [
            Mirror::parse(&format!("http://127.0.0.1:{port}/mnist")),
            Mirror::parse("/nonexistent/mirror"),
        ];
        let start = std::time::Instant::now();
        let message = format!(
            "{:#}",
            fetch_files(&mirror.files, &mirrors, dest.path()).unwrap_err()
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(
            message.contains(&format!("http://127.0.0.1:{port}/mnist/")),
            "{message}"
        );
        assert!(
            message.contains("/nonexistent/mirror: no such directory"),
            "{message}"
        );
        assert!(message.contains("--mirror"), "{message}");
        assert!(entries(dest.path()).is_empty());
    }

    #[test]
    fn mirror_order_is_flags_then_environment_then_public() {
        let order = mirror_order(
            &["/a".into(), "https://b.example/x".into()],
            Some("file:///c"),
        );
        assert_eq!(
            order,
            [
                Mirror::Dir("/a".into()),
                Mirror::Http("https://b.example/x/".into()),
                Mirror::Dir("/c".into()),
                Mirror::Http(PUBLIC_MIRRORS[0].into()),
                Mirror::Http(PUBLIC_MIRRORS[1].into()),
            ]
        );
        assert_eq!(mirror_order(&[], Some(" ")).len(), 2);
    }
}
