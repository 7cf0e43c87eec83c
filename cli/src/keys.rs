//! `amend keygen|sign|verify|inspect`: bundle keys and checks.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use amend_edits::bundle::stream::invisible;
use amend_edits::bundle::{self, Bundle, BundleBytes, Manifest, Payload, HEADER_LEN};
use amend_edits::editset::{check_binding, Clock, SystemClock};
use amend_edits::fsutil::{read_regular, MAX_KEY_FILE_LEN};
use amend_edits::keys::{self, key_id, to_hex, TrustStore};

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (secret seed, hex) and PREFIX.pub (public key, hex).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// The bundle to sign (rewritten in place unless --out is given).
    bundle: PathBuf,
    /// PREFIX.key written by `amend keygen`.
    #[arg(long)]
    key: PathBuf,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    bundle: PathBuf,
    /// Trusted public key file(s) (PREFIX.pub); repeat for several.
    #[arg(long, required = true)]
    pubkey: Vec<PathBuf>,
    /// Also check that the bundle was built for this GGUF model (fingerprint and dims).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Version store (anti-rollback state file shared with `amend run --state`): refuse a
    /// version below the channel's mark. Read only: verify does not raise the mark.
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct InspectArgs {
    bundle: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Verify against these public keys and say so (otherwise the signature is not checked).
    #[arg(long)]
    pubkey: Vec<PathBuf>,
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

pub fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    let bytes = a.out.as_os_str().as_encoded_bytes();
    // `.`, `..` and `dir/.` name directories too: they wrote the hidden files `..key`, `...key`.
    let last = bytes.rsplit(|&b| b == b'/').next().unwrap_or_default();
    if bytes.ends_with(b"/") || last == b"." || last == b".." {
        bail!(
            "--out {}: a prefix for PREFIX.key and PREFIX.pub, not a directory",
            a.out.display()
        );
    }
    let (kp, pp) = (with_ext(&a.out, ".key"), with_ext(&a.out, ".pub"));
    // Both paths before either file is written: a .pub that cannot be written must not cost
    // the old .key (with --force) and leave a key without its public half.
    for p in [&kp, &pp] {
        // symlink_metadata: a dangling link is a file there too, replaced only with --force.
        if std::fs::symlink_metadata(p).is_ok() && !a.force {
            bail!("{} exists (use --force to overwrite)", p.display());
        }
        crate::check_output_path("--out", p, true)?;
    }
    let sk = keys::generate_signing_key().context("reading OS randomness")?;
    let vk = sk.verifying_key();
    // Both files are staged beside their final names, the report is printed, and only then are
    // they renamed into place: a standard output that cannot take the report (`> /dev/full`)
    // fails the command with the old keys (with --force) untouched. A process killed before
    // the renames leaves temporary files named after the keys, which the next keygen removes.
    let secret = format!("{}\n", to_hex(&sk.to_bytes()));
    let public = format!("{}\n", to_hex(vk.as_bytes()));
    let staged = amend_edits::fsutil::stage(&kp, secret.as_bytes(), Some(0o600))
        .and_then(|k| Ok([k, amend_edits::fsutil::stage(&pp, public.as_bytes(), None)?]))
        .with_context(|| format!("writing {} and {}", kp.display(), pp.display()))?;
    let report = format!(
        "wrote {} and {} (key id {})\n",
        kp.display(),
        pp.display(),
        to_hex(&key_id(&vk))
    );
    let printed = {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(report.as_bytes()).and_then(|()| out.flush())
    };
    if let Err(e) = printed {
        drop(staged);
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            crate::stdout_failed(e);
        }
        bail!(
            "writing standard output: {e}; no key was written ({} and {} are unchanged)",
            kp.display(),
            pp.display()
        );
    }
    amend_edits::fsutil::commit_all(staged)?;
    Ok(())
}

pub fn sign(a: SignArgs) -> anyhow::Result<()> {
    let (out, out_flag) = match &a.out {
        Some(o) => (o.clone(), "--out"),
        None => (a.bundle.clone(), "BUNDLE"),
    };
    // --out naming the bundle itself, however spelled, is signing in place (with its checks).
    let in_place = a.out.is_none()
        || (std::fs::metadata(&a.bundle).is_ok()
            && crate::file_identity(&out) == crate::file_identity(&a.bundle));
    // The output must not be the key (or another name of the bundle) through any name or link.
    crate::check_outputs_apart(&[(out_flag, out.as_path())], &[("--key", a.key.as_path())])?;
    // A key file is never the output, even one that is not --key (k.pub beside k.key).
    if !in_place && (has_ext(&out, "key") || has_ext(&out, "pub")) {
        bail!(
            "--out {}: that names a key file (.key or .pub); give the signed bundle another \
             name (such as NAME.amend)",
            out.display()
        );
    }
    if in_place {
        check_sign_in_place(&out)?;
    }
    crate::check_output_path(out_flag, &out, true)?;
    // The replaced file keeps its permission bits (a private bundle stays private); a new
    // --out file takes the bundle's.
    let mode = file_mode(&out).or_else(|| file_mode(&a.bundle));
    let sk = read_signing_key(&a.key)?;
    // Header checked before the rest is read (a 5 GB sparse file or a FIFO costs nothing).
    let mut buf = bundle::read_file(&a.bundle)?.as_ref().to_vec();
    // Refuse to sign something whose manifest does not even decode: signing vouches for it.
    let h = bundle::read_header(&buf)?;
    let m = bundle::decode_manifest(&buf[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize])?;
    let at = h.sig_offset.get() as usize;
    let old_id: [u8; bundle::KEY_ID_LEN] = buf[at..at + bundle::KEY_ID_LEN].try_into()?;
    bundle::sign_in_place(&mut buf, &sk)?;
    // Check the result completely before writing it.
    let trust = TrustStore::with_key(sk.verifying_key());
    Bundle::from_bytes(&buf, &trust).context("bundle does not verify after signing")?;
    let new_id = key_id(&sk.verifying_key());
    // An unsigned bundle has a zeroed signature block; another key's signature is replaced.
    if old_id != [0; bundle::KEY_ID_LEN] && old_id != new_id {
        eprintln!(
            "note: {} was signed by key {}; its signature is replaced by key {}'s",
            a.bundle.display(),
            to_hex(&old_id),
            to_hex(&new_id)
        );
    }
    amend_edits::fsutil::write_atomic(&out, &buf, mode)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "signed {} ({} v{}) with key {}",
        out.display(),
        esc(&m.bundle_id),
        m.version,
        to_hex(&new_id)
    );
    Ok(())
}

/// The permission bits of an existing file (unix).
fn file_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Signing in place replaces the file by rename: a symbolic link would become a regular file
/// (its target left unsigned), and a hard link would be split from its other names.
fn check_sign_in_place(bundle: &Path) -> anyhow::Result<()> {
    let Ok(md) = std::fs::symlink_metadata(bundle) else {
        return Ok(()); // Not there: reading it says so.
    };
    if md.file_type().is_symlink() {
        let target = std::fs::read_link(bundle)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        bail!(
            "{} is a symbolic link to {target}: signing in place would replace the link with a \
             regular file and leave {target} unsigned; sign {target} itself, or give --out a new file",
            bundle.display()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if md.nlink() > 1 {
            bail!(
                "{} has {} hard links: signing in place would give this name a new file and \
                 leave the other names unsigned; give --out a new file",
                bundle.display(),
                md.nlink()
            );
        }
    }
    Ok(())
}

/// `s` with control characters (newline, ESC, U+0080..U+009F, ...) escaped (`\n`, `\u{1b}`):
/// text from a bundle or a data file must not add, rewrite or hide lines of what the terminal
/// shows. Invisible format characters and line separators are shown escaped too.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else if invisible(c) || matches!(c, '\u{2028}' | '\u{2029}') {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// serde_json writes DEL and U+0080..U+009F raw (a C1 control such as CSI U+009B acts like
/// `ESC [` on some terminals): write them as `\u00XX`. They only occur inside JSON strings,
/// where the escape means the same character.
fn json_escape_c1(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `path`'s file name ends in `.ext`.
fn has_ext(path: &Path, ext: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// The secret key of a signing command (`--key PREFIX.key`). Both key files are 64 hex
/// characters, so a `PREFIX.pub` given here would be read as a secret seed and sign with a key
/// nobody trusts, found only when a device refuses the bundle: it is refused by name.
pub(crate) fn read_signing_key(
    path: &Path,
) -> anyhow::Result<amend_edits::ed25519_dalek::SigningKey> {
    if has_ext(path, "pub") {
        bail!(
            "--key {}: that is a public key file; signing takes the secret key (PREFIX.key from \
             `amend keygen`)",
            path.display()
        );
    }
    let bytes = read_regular(path, MAX_KEY_FILE_LEN).with_context(|| "--key")?;
    keys::signing_key_from_file_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("--key {}: {e}", path.display()))
}

/// A public key bundles must be signed with (`--pubkey PREFIX.pub`). A `PREFIX.key` is the
/// secret key, which never leaves the signing machine: refused by name.
pub(crate) fn read_verifying_key(
    path: &Path,
) -> anyhow::Result<amend_edits::ed25519_dalek::VerifyingKey> {
    if has_ext(path, "key") {
        bail!(
            "--pubkey {}: that is a secret key file; verifying takes the public key (PREFIX.pub), \
             and the secret key should not be copied to where bundles are checked",
            path.display()
        );
    }
    let bytes = read_regular(path, MAX_KEY_FILE_LEN)
        .with_context(|| format!("reading public key {}", path.display()))?;
    keys::verifying_key_from_file_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("public key {}: {e}", path.display()))
}

pub(crate) fn trust_from(files: &[PathBuf]) -> anyhow::Result<TrustStore> {
    let mut t = TrustStore::new();
    for f in files {
        t.add(read_verifying_key(f)?)?;
    }
    Ok(t)
}

pub(crate) fn open(path: &Path, trust: &TrustStore) -> anyhow::Result<Bundle<BundleBytes>> {
    Bundle::open_file(path, trust)
        // Not "invalid": a good bundle is also refused for the trust given (an unknown key,
        // a secret key trusted in place of its public key).
        .with_context(|| format!("bundle {} refused", path.display()))
}

/// The context of a `--state` error: the flag, the value and what it takes.
fn state_flag(state: &Path) -> String {
    format!(
        "--state {} (the version store: a state file written by amend, or a path for a new one)",
        state.display()
    )
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let trust = trust_from(&a.pubkey)?;
    // Read only: verify never raises a mark, so it creates nothing (no lock file either).
    let store = match &a.state {
        Some(state) => Some((
            state,
            amend_edits::version_store::VersionStore::open_read_only(state)
                .with_context(|| state_flag(state))?,
        )),
        None => None,
    };
    let b = open(&a.bundle, &trust)?;
    let m = b.manifest();
    let now = SystemClock.now();
    if now >= m.expires {
        bail!("bundle expired at {} (now {now})", m.expires);
    }
    if now < m.not_before {
        bail!("bundle is not valid before {} (now {now})", m.not_before);
    }
    if let Some((state, store)) = &store {
        if let Some(mark) = store.get(&m.channel).with_context(|| state_flag(state))? {
            if m.version < mark.version {
                bail!(
                    "channel {:?} is at version {} in {}; {} would be a downgrade",
                    m.channel,
                    mark.version,
                    state.display(),
                    m.version
                );
            }
            if m.version == mark.version && mark.digest != b.signed_digest() {
                bail!(
                    "channel {:?} already had version {} in {} (replay)",
                    m.channel,
                    m.version,
                    state.display()
                );
            }
        }
    }
    if let Some(model) = &a.model {
        let t = std::time::Instant::now();
        let binding = amend_edits::fingerprint::model_binding(model)
            .with_context(|| format!("fingerprinting {}", model.display()))?;
        log::info!("model fingerprint in {:?}", t.elapsed());
        check_binding(&binding, &b)
            .with_context(|| format!("bundle does not fit {}", model.display()))?;
    }
    println!(
        "OK {} channel {} v{}: {} payloads, {} edits, {} payload bytes, signed by {}{}",
        esc(&m.bundle_id),
        esc(&m.channel),
        m.version,
        m.payloads.len(),
        m.edits.len(),
        b.payload_len(),
        to_hex(&b.key_id()),
        if a.model.is_some() {
            ", model matches"
        } else {
            ""
        }
    );
    Ok(())
}

fn payload_json(m: &Manifest, i: usize, p: &Payload) -> serde_json::Value {
    use serde_json::json;
    let rows = bundle::units(m, p);
    match p {
        Payload::Codebook(d) => json!({"index": i, "kind": "codebook", "layer": d.layer,
            "key_site": d.key_site, "replace_site": d.replace_site, "distance": d.distance,
            "all_positions": d.all_positions, "rows": rows}),
        Payload::PatchNeurons(d) => json!({"index": i, "kind": "patch_neurons", "layer": d.layer,
            "read_site": d.read_site, "write_site": d.write_site, "activation": d.activation, "neurons": rows}),
        Payload::LowRank(d) => {
            json!({"index": i, "kind": "low_rank", "tensors": d.tensors.iter().map(|t| json!({
            "name": t.name, "n_in": t.n_in, "n_out": t.n_out, "rank": t.rank, "alpha": t.alpha})).collect::<Vec<_>>()})
        }
        Payload::LowRankGguf(d) => json!({"index": i, "kind": "low_rank_gguf", "section": d.blob}),
        Payload::Memory(d) => json!({"index": i, "kind": "memory", "embed_dim": d.embed_dim,
            "threshold": d.threshold, "template": d.template, "records": d.records.len(),
            "embedder": format!("{:?}", d.embedder)}),
    }
}

/// The header, manifest and signer key id of a bundle file, reading only those bytes (the
/// header is checked against the file length first; the manifest is at most 64 MiB).
fn read_head(path: &Path) -> anyhow::Result<(bundle::Header, Manifest, [u8; bundle::KEY_ID_LEN])> {
    use std::io::{Read, Seek, SeekFrom};
    let (mut f, len) = amend_edits::fsutil::open_regular(path, bundle::MAX_BUNDLE_LEN)?;
    let mut head = vec![0u8; HEADER_LEN];
    let n = f.by_ref().take(HEADER_LEN as u64).read(&mut head)?;
    let h = bundle::read_header_of(&head[..n], len)?;
    let mut manifest = vec![0u8; h.manifest_len.get() as usize];
    f.read_exact(&mut manifest)
        .with_context(|| format!("reading the manifest of {}", path.display()))?;
    let m = bundle::decode_manifest(&manifest)?;
    let mut signer = [0u8; bundle::KEY_ID_LEN];
    f.seek(SeekFrom::Start(h.sig_offset.get()))?;
    f.read_exact(&mut signer)?;
    Ok((h, m, signer))
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    use serde_json::json;
    let (h, m, signer) = read_head(&a.bundle)?;
    let signer = &signer[..];
    let verified = if a.pubkey.is_empty() {
        None
    } else {
        let trust = trust_from(&a.pubkey)?;
        Some(match Bundle::open_file(&a.bundle, &trust) {
            Ok(b) => Ok(b),
            Err(bundle::OpenError::Bundle(e)) => Err(e.to_string()),
            Err(e) => return Err(e.into()),
        })
    };
    // The edit slots an ONNX Runtime graph needs for this bundle (verified bundles only).
    let slots = match &verified {
        Some(Ok(b)) => Some(
            amend_runtime::onnxruntime::SlotLayout::for_bundles([b])
                .map(|l| l.describe())
                .map_err(|e| e.to_string()),
        ),
        _ => None,
    };
    let verified = verified.map(|r| r.map(|_| ()));
    // Payload descriptors are only shown when the manifest passes its checks.
    let payloads = bundle::check_manifest(&m, None);
    if a.json {
        let v = json!({
            "format": format!("{}.{}", h.major.get(), h.minor.get()),
            "total_len": h.total_len.get(),
            "manifest_len": h.manifest_len.get(),
            "key_id": to_hex(signer),
            "verified": verified.as_ref().map(|r| r.is_ok()),
            "verify_error": verified.as_ref().and_then(|r| r.clone().err()),
            "bundle_id": m.bundle_id, "channel": m.channel, "version": m.version,
            "created": m.created, "not_before": m.not_before, "expires": m.expires,
            "model": {"fingerprint": to_hex(&m.model.fingerprint), "arch": m.model.arch,
                      "n_layer": m.model.n_layer, "n_embd": m.model.n_embd},
            "sections": m.sections.iter().map(|s| json!({"kind": s.kind, "dtype": s.dtype, "shape": s.shape,
                "offset": s.offset, "len": s.len, "sha256": to_hex(&s.sha256)})).collect::<Vec<_>>(),
            "payloads": match &payloads {
                Ok(ps) => ps.iter().enumerate().map(|(i, p)| payload_json(&m, i, p)).collect::<Vec<_>>(),
                Err(_) => vec![],
            },
            "manifest_error": payloads.as_ref().err().map(|e| e.to_string()),
            "ort_slots": slots.as_ref().and_then(|s| s.as_ref().ok()),
            "verification": m.verification.as_ref().map(|v| json!({"required": v.required,
                "backends": v.backends.iter().map(|b| json!({"backend": b.backend,
                    "passed": b.passed, "total": b.total})).collect::<Vec<_>>()})),
            "edits": m.edits.iter().map(|e| json!({"id": e.id, "layer": e.layer, "site": e.site,
                "prompt": e.prompt, "target": e.target, "payload": e.payload, "first": e.first,
                "count": e.count})).collect::<Vec<_>>(),
        });
        println!("{}", json_escape_c1(&serde_json::to_string_pretty(&v)?));
        return Ok(());
    }
    // Every string from the bundle is escaped: it is not checked yet (nor at all without
    // --pubkey), and a newline or ESC in it could forge or hide lines below.
    println!(
        "bundle   {} (channel {}, version {})",
        esc(&m.bundle_id),
        esc(&m.channel),
        m.version
    );
    println!(
        "format   {}.{}, {} bytes, manifest {} bytes",
        h.major.get(),
        h.minor.get(),
        h.total_len.get(),
        h.manifest_len.get()
    );
    match &verified {
        None => println!(
            "signer   {} (signature NOT checked: pass --pubkey)",
            to_hex(signer)
        ),
        Some(Ok(())) => println!("signer   {} (verified)", to_hex(signer)),
        Some(Err(e)) => println!("signer   {} (INVALID: {})", to_hex(signer), esc(e)),
    }
    println!(
        "valid    {} .. {} (created {})",
        m.not_before, m.expires, m.created
    );
    match &m.verification {
        None => println!("verified not recorded (format 1.1)"),
        Some(v) => println!(
            "verified {}{}",
            esc(&v.describe()),
            if v.required {
                " (required: refused on other backends)"
            } else {
                " (other backends warn in explain)"
            }
        ),
    }
    println!(
        "model    {} n_layer={} n_embd={} fingerprint {}",
        esc(&m.model.arch),
        m.model.n_layer,
        m.model.n_embd,
        to_hex(&m.model.fingerprint)
    );
    match &slots {
        Some(Ok(l)) if l.is_empty() => {
            println!("slots    none (ONNX Runtime: no edit slots needed)")
        }
        Some(Ok(l)) => println!("slots    {} (ONNX Runtime: --slots / edit_slots)", esc(l)),
        Some(Err(e)) => println!("slots    ({})", esc(e)),
        None => {}
    }
    println!("sections {}", m.sections.len());
    for (i, s) in m.sections.iter().enumerate() {
        println!(
            "  [{i}] kind {} dtype {} shape {:?} @{} len {}",
            s.kind, s.dtype, s.shape, s.offset, s.len
        );
    }
    match &payloads {
        Ok(ps) => {
            println!("payloads {}", ps.len());
            for (i, p) in ps.iter().enumerate() {
                println!("  [{i}] {}", esc(&payload_json(&m, i, p).to_string()));
            }
        }
        Err(e) => println!("payloads: manifest invalid: {}", esc(&e.to_string())),
    }
    println!("edits    {}", m.edits.len());
    for e in &m.edits {
        println!(
            "  {} layer {} site {}: {:?} -> {:?} (payload {} units {}..{})",
            esc(&e.id),
            e.layer,
            e.site,
            e.prompt,
            e.target,
            e.payload,
            e.first,
            e.first + e.count
        );
    }
    if let Some(Err(e)) = verified {
        bail!("bundle does not verify: {e}");
    }
    Ok(())
}

/// The edit set of `amend run` and `amend eval`: the bundles, verified against the public keys
/// and bound to the model file, activated in order.
pub(crate) fn load_edit_set(
    model: &Path,
    bundles: &[PathBuf],
    pubkeys: &[PathBuf],
    state: Option<&Path>,
) -> anyhow::Result<std::sync::Arc<amend_edits::EditSet>> {
    if pubkeys.is_empty() {
        anyhow::bail!(
            "--bundle needs --pubkey: bundles are only applied after their signature is verified"
        );
    }
    let trust = trust_from(pubkeys)?;
    // Before the model is fingerprinted: a bad --state is an argument error.
    let store = match state {
        Some(state) => Some(
            amend_edits::version_store::VersionStore::open(state)
                .with_context(|| state_flag(state))?,
        ),
        None => None,
    };
    let binding = amend_edits::fingerprint::model_binding(model)
        .with_context(|| format!("fingerprinting {}", model.display()))?;
    let mut set = amend_edits::EditSet::new(binding, trust);
    if let Some(store) = store {
        set = set.with_version_store(std::sync::Arc::new(store));
    }
    for path in bundles {
        let b = open(path, set.trust())?;
        set.add(std::sync::Arc::new(b), amend_edits::AddOptions::default())
            .with_context(|| format!("activating {}", path.display()))?;
    }
    Ok(std::sync::Arc::new(set))
}

#[cfg(test)]
mod tests {
    use super::esc;

    /// What `inspect` prints of a bundle's text: control characters and the invisible format
    /// characters that reorder or hide text are escaped; other text is kept.
    #[test]
    fn printed_text_cannot_reorder_or_hide_lines() {
        assert_eq!(esc("a\nb\x1b[8m"), "a\\nb\\u{1b}[8m");
        assert_eq!(esc("id\u{202e}gnp.exe"), "id\\u{202e}gnp.exe");
        assert_eq!(
            esc("x\u{200b}y\u{2066}z\u{feff}"),
            "x\\u{200b}y\\u{2066}z\\u{feff}"
        );
        assert_eq!(esc("Café — 東京"), "Café — 東京");
    }
}
