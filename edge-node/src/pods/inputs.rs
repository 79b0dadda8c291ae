//! What a container is given besides its image: environment variables (from
//! literals, ConfigMaps, Secrets and the pod's own fields) and volumes
//! (ConfigMap and Secret keys written as files under the data dir, empty
//! dirs, host paths), all read from the local replica so that they work
//! offline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use k8s_cri::v1 as cri;
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::schema::{ConfigMapDoc, Container, KeyRef, PodSpecDoc, SecretDoc, Volume};

/// Why a container's configuration cannot be built; kubelet's
/// `CreateContainerConfigError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where a pod's ConfigMaps and Secrets are looked up.
pub(crate) struct Lookup<'a> {
    pub engine: &'a Engine,
    pub node: &'a str,
    pub site: Option<&'a str>,
}

impl Lookup<'_> {
    fn ids(&self, kind: DocKind, ns: &str, name: &str) -> Vec<DocId> {
        let mut ids = Vec::new();
        if let Ok(id) = DocId::new(kind, Owner::Node(self.node), &[ns, name]) {
            ids.push(id);
        }
        if let Some(site) = self.site
            && let Ok(id) = DocId::new(kind, Owner::Site(site), &[ns, name])
        {
            ids.push(id);
        }
        ids
    }

    /// A ConfigMap's values as bytes (`data` and decoded `binaryData`).
    pub fn config_map(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
        for id in self.ids(DocKind::ConfigMap, ns, name) {
            let doc = self
                .engine
                .with_replica(|r| r.get::<ConfigMapDoc>(&id))
                .map_err(|e| ConfigError(format!("configmap \"{name}\" cannot be read: {e}")))?;
            if let Some(doc) = doc {
                let mut values: BTreeMap<String, Vec<u8>> = doc
                    .data
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in doc.binary_data {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_bytes())
                        .map_err(|e| {
                            ConfigError(format!(
                                "configmap \"{name}\" key {k}: invalid base64: {e}"
                            ))
                        })?;
                    values.insert(k, bytes);
                }
                return Ok(Some(values));
            }
        }
        Ok(None)
    }

    /// A Secret's values, decoded.
    pub fn secret(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ConfigError> {
        for id in self.ids(DocKind::Secret, ns, name) {
            let doc = self
                .engine
                .with_replica(|r| r.get::<SecretDoc>(&id))
                .map_err(|e| ConfigError(format!("secret \"{name}\" cannot be read: {e}")))?;
            if let Some(doc) = doc {
                let mut values = BTreeMap::new();
                for (k, v) in doc.data {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_bytes())
                        .map_err(|e| {
                            ConfigError(format!("secret \"{name}\" key {k}: invalid base64: {e}"))
                        })?;
                    values.insert(k, bytes);
                }
                return Ok(Some(values));
            }
        }
        Ok(None)
    }
}

/// Facts about the pod that `fieldRef` may name.
pub(crate) struct PodFacts<'a> {
    pub spec: &'a PodSpecDoc,
    pub node: &'a str,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
}

/// The value of `r.key` in a ConfigMap's or Secret's values (`None` when the
/// object is absent), as kubelet resolves an env var's key reference: a
/// missing object or key is an error unless the reference is optional.
fn key_value(
    values: Option<BTreeMap<String, Vec<u8>>>,
    r: &KeyRef,
    what: &str,
    ns: &str,
) -> Result<Option<String>, ConfigError> {
    let optional = r.optional == Some(true);
    match values {
        Some(m) => match m.get(&r.key) {
            Some(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
            None if optional => Ok(None),
            None => Err(ConfigError(format!(
                "couldn't find key {} in {what} {ns}/{}",
                r.key, r.name
            ))),
        },
        None if optional => Ok(None),
        None => Err(ConfigError(format!("{what} \"{}\" not found", r.name))),
    }
}

fn field(facts: &PodFacts<'_>, path: &str) -> Result<String, ConfigError> {
    let bracket = |prefix: &str, map: &BTreeMap<String, String>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(map.get(key).cloned().unwrap_or_default())
    };
    Ok(match path {
        "metadata.name" => facts.spec.name.clone(),
        "metadata.namespace" => facts.spec.namespace.clone(),
        "metadata.uid" => facts.spec.uid.clone(),
        "spec.nodeName" => facts.node.to_owned(),
        "spec.serviceAccountName" => String::new(),
        "status.podIP" | "status.podIPs" => facts.pod_ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_owned(),
        _ => bracket("metadata.labels", &facts.spec.labels)
            .or_else(|| bracket("metadata.annotations", &facts.spec.annotations))
            .ok_or_else(|| ConfigError(format!("unsupported fieldRef {path:?}")))?,
    })
}

/// Expands `$(NAME)` references to earlier variables as kubelet does: an
/// unknown reference stays as written, `$$` is a literal `$`.
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment, in order: `envFrom` sources first, then
/// `env` (later entries win, as in Kubernetes).
pub(crate) fn environment(
    lookup: &Lookup<'_>,
    facts: &PodFacts<'_>,
    container: &Container,
) -> Result<Vec<(String, String)>, ConfigError> {
    let ns = &facts.spec.namespace;
    let mut order: Vec<String> = Vec::new();
    let mut vars: HashMap<String, String> = HashMap::new();
    let set =
        |order: &mut Vec<String>, vars: &mut HashMap<String, String>, k: String, v: String| {
            if !vars.contains_key(&k) {
                order.push(k.clone());
            }
            vars.insert(k, v);
        };
    for source in &container.env_from {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (values, name, optional, what) = if let Some(r) = &source.config_map_ref {
            (
                lookup.config_map(ns, &r.name)?,
                &r.name,
                r.optional,
                "configmap",
            )
        } else if let Some(r) = &source.secret_ref {
            (lookup.secret(ns, &r.name)?, &r.name, r.optional, "secret")
        } else {
            continue;
        };
        match values {
            Some(values) => {
                for (k, v) in values {
                    set(
                        &mut order,
                        &mut vars,
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            None if optional == Some(true) => {}
            None => return Err(ConfigError(format!("{what} \"{name}\" not found"))),
        }
    }
    for var in &container.env {
        let value = if let Some(source) = &var.value_from {
            if let Some(r) = &source.config_map_key_ref {
                key_value(lookup.config_map(ns, &r.name)?, r, "configmap", ns)?
            } else if let Some(r) = &source.secret_key_ref {
                key_value(lookup.secret(ns, &r.name)?, r, "secret", ns)?
            } else if let Some(f) = &source.field_ref {
                Some(field(facts, &f.field_path)?)
            } else {
                None
            }
        } else {
            Some(expand(var.value.as_deref().unwrap_or_default(), &vars))
        };
        if let Some(value) = value {
            set(&mut order, &mut vars, var.name.clone(), value);
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|k| vars.get(&k).map(|v| (k.clone(), v.clone())))
        .collect())
}

/// A relative path that stays inside its folder.
fn safe_relative(path: &str) -> Result<PathBuf, ConfigError> {
    let p = Path::new(path);
    if path.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ConfigError(format!("invalid volume path {path:?}")));
    }
    Ok(p.to_path_buf())
}

/// The folder of a pod's volume.
pub(crate) fn volume_dir(pod_dir: &Path, volume: &str) -> PathBuf {
    pod_dir.join("volumes").join(volume)
}

/// Writes the files of `values` (or of `items` only) into `dir`, replacing
/// changed files atomically and removing files whose key is gone.
fn project(
    dir: &Path,
    values: &BTreeMap<String, Vec<u8>>,
    items: &[outpost_sync::schema::KeyToPath],
    mode: u32,
    what: &str,
) -> Result<(), ConfigError> {
    let io = |e: std::io::Error| ConfigError(format!("cannot write volume {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut files: Vec<(PathBuf, &[u8])> = Vec::new();
    if items.is_empty() {
        for (k, v) in values {
            files.push((safe_relative(k)?, v));
        }
    } else {
        for item in items {
            let v = values
                .get(&item.key)
                .ok_or_else(|| ConfigError(format!("{what}: no key {:?}", item.key)))?;
            files.push((safe_relative(&item.path)?, v));
        }
    }
    write_files(dir, &files, mode)
}

/// Writes `files` into `dir`, replacing changed files atomically and
/// removing files that are not listed.
fn write_files(dir: &Path, files: &[(PathBuf, &[u8])], mode: u32) -> Result<(), ConfigError> {
    let io = |e: std::io::Error| ConfigError(format!("cannot write volume {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let keep: BTreeSet<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    for (rel, bytes) in files {
        let path = dir.join(rel);
        if std::fs::read(&path).ok().as_deref() == Some(*bytes) {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let tmp = path.with_extension("outpost-tmp");
        std::fs::write(&tmp, bytes).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    // Files of keys that are gone.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let rel = PathBuf::from(entry.file_name());
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) && !keep.contains(&rel) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// Writes (or refreshes) the files of a pod's ConfigMap and Secret volumes
/// and creates its empty dirs. Idempotent; called at every sync so that a
/// changed ConfigMap reaches running containers.
pub(crate) fn prepare_volumes(
    lookup: &Lookup<'_>,
    spec: &PodSpecDoc,
    pod_dir: &Path,
) -> Result<(), ConfigError> {
    for volume in &spec.volumes {
        let dir = volume_dir(pod_dir, &volume.name);
        safe_relative(&volume.name)?;
        if let Some(cm) = &volume.config_map {
            match lookup.config_map(&spec.namespace, &cm.name)? {
                Some(values) => {
                    project(&dir, &values, &cm.items, mode(cm.default_mode), "configmap")?
                }
                None if cm.optional == Some(true) => {
                    project(&dir, &BTreeMap::new(), &[], 0o644, "configmap")?
                }
                None => return Err(ConfigError(format!("configmap \"{}\" not found", cm.name))),
            }
        } else if let Some(secret) = &volume.secret {
            match lookup.secret(&spec.namespace, &secret.secret_name)? {
                Some(values) => project(
                    &dir,
                    &values,
                    &secret.items,
                    mode(secret.default_mode),
                    "secret",
                )?,
                None if secret.optional == Some(true) => {
                    project(&dir, &BTreeMap::new(), &[], 0o644, "secret")?
                }
                None => {
                    return Err(ConfigError(format!(
                        "secret \"{}\" not found",
                        secret.secret_name
                    )));
                }
            }
        } else if let Some(projected) = &volume.projected {
            let files = projected_files(lookup, spec, projected)?;
            let borrowed: Vec<(PathBuf, &[u8])> = files
                .iter()
                .map(|(p, b)| (p.clone(), b.as_slice()))
                .collect();
            write_files(&dir, &borrowed, mode(projected.default_mode))?;
        } else if volume.empty_dir.is_some() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| ConfigError(format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    Ok(())
}

/// The files of a projected volume's sources. A service account token has
/// no file: the edge has no token to give.
fn projected_files(
    lookup: &Lookup<'_>,
    spec: &PodSpecDoc,
    projected: &outpost_sync::schema::ProjectedVolume,
) -> Result<Vec<(PathBuf, Vec<u8>)>, ConfigError> {
    let mut files = Vec::new();
    fn add(
        files: &mut Vec<(PathBuf, Vec<u8>)>,
        values: BTreeMap<String, Vec<u8>>,
        items: &[outpost_sync::schema::KeyToPath],
        what: &str,
    ) -> Result<(), ConfigError> {
        if items.is_empty() {
            for (k, v) in values {
                files.push((safe_relative(&k)?, v));
            }
        } else {
            for item in items {
                let v = values
                    .get(&item.key)
                    .ok_or_else(|| ConfigError(format!("{what}: no key {:?}", item.key)))?;
                files.push((safe_relative(&item.path)?, v.clone()));
            }
        }
        Ok(())
    }
    for source in &projected.sources {
        if let Some(cm) = &source.config_map {
            match lookup.config_map(&spec.namespace, &cm.name)? {
                Some(values) => add(&mut files, values, &cm.items, "configmap")?,
                None if cm.optional == Some(true) => {}
                None => return Err(ConfigError(format!("configmap \"{}\" not found", cm.name))),
            }
        } else if let Some(secret) = &source.secret {
            match lookup.secret(&spec.namespace, &secret.name)? {
                Some(values) => add(&mut files, values, &secret.items, "secret")?,
                None if secret.optional == Some(true) => {}
                None => return Err(ConfigError(format!("secret \"{}\" not found", secret.name))),
            }
        } else if let Some(api) = &source.downward_api {
            // Metadata fields only: the pod's IPs are not known yet when its
            // volumes are written.
            let facts = PodFacts {
                spec,
                node: "",
                pod_ip: "",
                host_ip: "",
            };
            for item in &api.items {
                if let Some(f) = &item.field_ref {
                    files.push((
                        safe_relative(&item.path)?,
                        field(&facts, &f.field_path)?.into_bytes(),
                    ));
                }
            }
        }
    }
    Ok(files)
}

fn mode(default_mode: Option<i32>) -> u32 {
    default_mode.map(|m| (m as u32) & 0o777).unwrap_or(0o644)
}

/// The CRI mounts of a container.
pub(crate) fn mounts(
    spec: &PodSpecDoc,
    container: &Container,
    pod_dir: &Path,
) -> Result<Vec<cri::Mount>, ConfigError> {
    let mut out = Vec::new();
    for m in &container.volume_mounts {
        let volume: &Volume = spec
            .volumes
            .iter()
            .find(|v| v.name == m.name)
            .ok_or_else(|| {
                ConfigError(format!("volumeMount {:?}: no volume of that name", m.name))
            })?;
        let (base, forced_ro) = if let Some(host) = &volume.host_path {
            if matches!(host.kind.as_deref(), Some("DirectoryOrCreate")) {
                let _ = std::fs::create_dir_all(&host.path);
            }
            (PathBuf::from(&host.path), false)
        } else if volume.config_map.is_some()
            || volume.secret.is_some()
            || volume.projected.is_some()
        {
            (volume_dir(pod_dir, &volume.name), true)
        } else if volume.empty_dir.is_some() {
            (volume_dir(pod_dir, &volume.name), false)
        } else {
            return Err(ConfigError(format!(
                "volume {:?}: unsupported volume source",
                volume.name
            )));
        };
        let host_path = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => base.join(safe_relative(sub)?),
            None => base,
        };
        out.push(cri::Mount {
            container_path: m.mount_path.clone(),
            host_path: host_path.to_string_lossy().into_owned(),
            readonly: forced_ro || m.read_only == Some(true),
            ..Default::default()
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubelet() {
        let vars: HashMap<String, String> = [("A".to_owned(), "1".to_owned())].into();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A) $", &vars), "$(A) $");
    }

    #[test]
    fn volume_paths_stay_inside() {
        assert!(safe_relative("../etc/passwd").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("conf/app.toml").is_ok());
    }
}
