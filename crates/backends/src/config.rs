//! The backends' configuration: one closed enum of every backend's options, registered with
//! one `match`, and what a service gives its backend (its [`Workload`]).
//!
//! Each backend's module owns its options type, their validation and their tests
//! ([`docker::DockerConfig`](crate::docker::DockerConfig),
//! [`swarm::SwarmConfig`](crate::swarm::SwarmConfig),
//! [`process::ProcessConfig`](crate::process::ProcessConfig)); this file only dispatches.
//! Validation is pure: nothing here connects anywhere.

use std::collections::BTreeMap;

use microscaler_core::plugin::{BackendPlugins, Capabilities, ServiceContext};
use microscaler_core::validate::join;
use microscaler_core::Validator;
use serde::Deserialize;

use crate::{docker, ecs, kubernetes, marathon, nomad, process, swarm};

/// The plugin set of this build: every source and every backend.
pub type Plugins = (microscaler_sources::SourceConfig, BackendConfig);
/// A configuration validated with every built-in plugin.
pub type Config = microscaler_core::Config<Plugins>;
/// A service of such a configuration.
pub type Service = microscaler_core::Service<Plugins>;

/// The orchestrator microscaler drives, with its validated options.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendConfig {
    /// A single Docker Engine: microscaler creates and removes containers itself.
    Docker(docker::DockerConfig),
    /// Docker Swarm: microscaler sets each Swarm service's replica count.
    Swarm(swarm::SwarmConfig),
    /// Local child processes, where no container engine runs.
    Process(process::ProcessConfig),
    /// Kubernetes: microscaler sets the replicas of Deployments and StatefulSets.
    Kubernetes(kubernetes::KubernetesConfig),
    /// Nomad: microscaler sets the counts of jobs' task groups.
    Nomad(nomad::NomadConfig),
    /// Marathon: microscaler sets the instances of apps.
    Marathon(marathon::MarathonConfig),
    /// AWS ECS: microscaler sets the desiredCount of ECS services.
    Ecs(ecs::EcsConfig),
}

impl BackendPlugins for BackendConfig {
    type Workload = Workload;
    const TYPES: &'static [&'static str] = &[
        "docker",
        "swarm",
        "process",
        "kubernetes",
        "nomad",
        "marathon",
        "ecs",
    ];

    fn validate(kind: &str, options: toml::Table, v: &mut Validator, path: &str) -> Option<Self> {
        let options = toml::Value::Table(options);
        Some(match kind {
            "docker" => BackendConfig::Docker(docker::DockerConfig::validate(options, v, path)?),
            "swarm" => BackendConfig::Swarm(swarm::SwarmConfig::validate(options, v, path)?),
            "process" => {
                BackendConfig::Process(process::ProcessConfig::validate(options, v, path)?)
            }
            "kubernetes" => {
                BackendConfig::Kubernetes(kubernetes::KubernetesConfig::validate(options, v, path)?)
            }
            "nomad" => BackendConfig::Nomad(nomad::NomadConfig::validate(options, v, path)?),
            "marathon" => {
                BackendConfig::Marathon(marathon::MarathonConfig::validate(options, v, path)?)
            }
            "ecs" => BackendConfig::Ecs(ecs::EcsConfig::validate(options, v, path)?),
            other => unreachable!("the core checks backend types against TYPES, got {other:?}"),
        })
    }

    fn workload(
        &self,
        options: toml::Table,
        cx: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Workload> {
        match self {
            BackendConfig::Docker(_) => docker::DockerConfig::workload(options, cx, v, path),
            BackendConfig::Swarm(_) => swarm::SwarmConfig::workload(options, cx, v, path),
            BackendConfig::Process(_) => process::ProcessConfig::workload(options, cx, v, path),
            BackendConfig::Kubernetes(k) => k.workload(options, cx, v, path),
            BackendConfig::Nomad(n) => n.workload(options, cx, v, path),
            BackendConfig::Marathon(m) => m.workload(options, cx, v, path),
            BackendConfig::Ecs(e) => e.workload(options, cx, v, path),
        }
    }

    fn capabilities(&self) -> Capabilities {
        match self {
            BackendConfig::Docker(_) => docker::CAPABILITIES,
            BackendConfig::Swarm(_) => swarm::CAPABILITIES,
            BackendConfig::Process(_) => process::CAPABILITIES,
            BackendConfig::Kubernetes(_) => kubernetes::CAPABILITIES,
            BackendConfig::Nomad(_) => nomad::CAPABILITIES,
            BackendConfig::Marathon(_) => marathon::CAPABILITIES,
            BackendConfig::Ecs(_) => ecs::CAPABILITIES,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            BackendConfig::Docker(_) => "docker",
            BackendConfig::Swarm(_) => "swarm",
            BackendConfig::Process(_) => "process",
            BackendConfig::Kubernetes(_) => "kubernetes",
            BackendConfig::Nomad(_) => "nomad",
            BackendConfig::Marathon(_) => "marathon",
            BackendConfig::Ecs(_) => "ecs",
        }
    }
}

/// What a service gives its backend.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// microscaler runs the replicas itself (or creates the orchestrator's object) from this.
    Managed(RunSpec),
    /// The service is an object that exists in the orchestrator (`[services.reference]`):
    /// microscaler sets its replica count and never creates, changes otherwise or deletes it.
    Reference(Reference),
}

impl Default for Workload {
    fn default() -> Self {
        Workload::Managed(RunSpec::default())
    }
}

impl Workload {
    /// What the replicas run, for a managed service.
    pub fn run(&self) -> Option<&RunSpec> {
        match self {
            Workload::Managed(r) => Some(r),
            Workload::Reference(_) => None,
        }
    }

    /// What the replicas run, to change it (tests and tools that build services in code).
    pub fn run_mut(&mut self) -> Option<&mut RunSpec> {
        match self {
            Workload::Managed(r) => Some(r),
            Workload::Reference(_) => None,
        }
    }

    /// The orchestrator object a referencing service is.
    pub fn reference(&self) -> Option<&Reference> {
        match self {
            Workload::Managed(_) => None,
            Workload::Reference(r) => Some(r),
        }
    }

    /// Validates a service's own keys for a backend that runs its replicas itself:
    /// `[services.reference]` is refused with a message naming the backend, the rest is
    /// [`RunSpec::validate`]d.
    pub(crate) fn managed_only(
        backend: &str,
        mut options: toml::Table,
        v: &mut Validator,
        path: &str,
    ) -> Option<RunSpec> {
        if options.remove(REFERENCE).is_some() {
            v.err(
                join(path, REFERENCE),
                format!(
                    "the {backend} backend creates its replicas itself and cannot reference an \
                     existing object; describe the replicas with image, command and env instead"
                ),
            );
        }
        RunSpec::validate(options, v, path)
    }

    /// Validates a service's own keys for a backend whose services may reference an existing
    /// object: with `[services.reference]` (validated by `reference`, at its path) no `image`,
    /// `command` or `env` may be given; without it the keys are a [`RunSpec`].
    pub(crate) fn managed_or_reference(
        mut options: toml::Table,
        v: &mut Validator,
        path: &str,
        reference: impl FnOnce(toml::Value, &mut Validator, &str) -> Option<Reference>,
    ) -> Option<Workload> {
        let Some(table) = options.remove(REFERENCE) else {
            return RunSpec::validate(options, v, path).map(Workload::Managed);
        };
        for key in ["image", "command", "env"] {
            if options.remove(key).is_some() {
                v.err(
                    join(path, key),
                    "a service with [services.reference] runs what the referenced object runs; \
                     remove this key (or the reference, to have microscaler create the object)",
                );
            }
        }
        // Any other key is unknown, reported as RunSpec would.
        RunSpec::validate(options, v, path)?;
        reference(table, v, &join(path, REFERENCE)).map(Workload::Reference)
    }
}

/// The service key naming an existing orchestrator object.
const REFERENCE: &str = "reference";

/// An object that exists in the orchestrator, which a service stands for. Each backend that
/// can reference objects owns its variant's type and validation.
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    /// An existing Swarm service.
    Swarm(swarm::SwarmReference),
    /// An existing Deployment, StatefulSet or DaemonSet.
    Kubernetes(kubernetes::KubernetesReference),
    /// An existing Nomad job's task group.
    Nomad(nomad::NomadReference),
    /// An existing Marathon app.
    Marathon(marathon::MarathonReference),
    /// An existing ECS service.
    Ecs(ecs::EcsReference),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Swarm(r) => write!(f, "Swarm service {}", r.service),
            Reference::Kubernetes(r) => r.fmt(f),
            Reference::Nomad(r) => r.fmt(f),
            Reference::Marathon(r) => r.fmt(f),
            Reference::Ecs(r) => r.fmt(f),
        }
    }
}

/// What a managed service's replicas run: the service's `image`, `command` and `env` keys.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunSpec {
    /// Container image (container backends). `None` means the built-in replica image.
    pub image: Option<String>,
    /// Command: the container's command, or the program and its arguments for the process
    /// backend. Empty means the image's default (containers) or the built-in replica (processes).
    pub command: Vec<String>,
    /// Environment given to each replica. Nothing else is passed: the daemon's own environment
    /// never reaches a replica.
    pub env: BTreeMap<String, String>,
    /// The docker and swarm backends only (`init = true`): an init process runs as each
    /// container's PID 1 (Docker's `--init`), passing SIGTERM on to the command and reaping
    /// its children, so a command that ignores signals as PID 1 stops at once instead of after
    /// its whole `stop_grace`. Other backends refuse the key.
    pub init: bool,
}

#[derive(Deserialize)]
struct RawRun {
    image: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

impl RunSpec {
    /// Takes a service's `init` key out of `options` (the backends that run containers
    /// themselves: docker and swarm): `true` or `false`; `None` when it is not given.
    pub(crate) fn take_init(
        options: &mut toml::Table,
        v: &mut Validator,
        path: &str,
    ) -> Option<bool> {
        match options.remove("init")? {
            toml::Value::Boolean(b) => Some(b),
            other => {
                v.err(
                    join(path, "init"),
                    format!("must be true or false, got {other}"),
                );
                Some(false)
            }
        }
    }

    /// Validates a service's `image`, `command` and `env` keys; any other key of `options` is
    /// an error. `path` is the service's.
    pub(crate) fn validate(options: toml::Table, v: &mut Validator, path: &str) -> Option<Self> {
        let r: RawRun = v.part(toml::Value::Table(options), path)?;
        for key in r.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                v.err(join(path, "env"), format!("invalid variable name {key:?}"));
            }
        }
        if let Some(image) = &r.image {
            if image.trim().is_empty() {
                v.err(join(path, "image"), "must not be empty");
            }
        }
        if r.command.iter().any(|c| c.contains('\0')) {
            v.err(join(path, "command"), "must not contain NUL characters");
        }
        Some(RunSpec {
            image: r.image,
            command: r.command,
            env: r.env,
            init: false,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use microscaler_core::plugin::SourcePlugins;

    /// A configuration with the backend section `backend` (TOML keys) and one remainder
    /// service whose extra keys are `service`.
    pub fn config(backend: &str, service: &str) -> Result<Config, Vec<String>> {
        let text = format!(
            "instance = \"t\"\n[capacity]\nslots = 4\n[backend]\n{backend}\n[[services]]\nname = \"w\"\nremainder = true\n{service}\n"
        );
        Config::from_toml(&text).map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn unknown_types_list_valid_ones() {
        assert_eq!(
            config("type = \"k8s\"", "").unwrap_err(),
            vec!["backend.type: unknown backend \"k8s\": valid types are docker, swarm, process, kubernetes, nomad, marathon, ecs"]
        );
        assert!(
            BackendConfig::TYPES.len() == 7
                && microscaler_sources::SourceConfig::TYPES.contains(&"random")
        );
    }

    #[test]
    fn resources_need_a_backend_that_reports_its_hosts() {
        let with = |backend: &str, service: &str| {
            let text = format!(
                "instance = \"t\"\n[capacity]\nresources = true\n[backend]\n{backend}\n[[services]]\nname = \"w\"\nremainder = true\nresources = {{ cpu = \"1\", memory = \"1Gi\" }}\n{service}\n"
            );
            Config::from_toml(&text)
                .map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())
        };
        for (backend, service) in [
            ("type = \"docker\"", ""),
            ("type = \"swarm\"", ""),
            ("type = \"process\"", ""),
            ("type = \"kubernetes\"", "image = \"i\""),
            ("type = \"nomad\"\nmhz_per_cpu = 2400", "image = \"i\""),
            ("type = \"ecs\"", "image = \"i\""),
        ] {
            let c = with(backend, service);
            assert!(c.is_ok(), "{backend}: {:?}", c.err());
        }
        assert_eq!(
            with("type = \"marathon\"\naddress = \"http://mesos:8080\"", "image = \"i\"").unwrap_err(),
            vec!["capacity.resources: the marathon backend does not report its hosts' CPU and memory, so capacity cannot be counted in resources with it; count it in slots"]
        );
        assert_eq!(
            with("type = \"nomad\"\nmhz_per_cpu = 0", "image = \"i\"").unwrap_err(),
            vec!["backend.mhz_per_cpu: must be between 1 and 1000000 (MHz of Nomad's CPU per CPU), got 0"]
        );
        assert_eq!(
            with("type = \"process\"\nallocatable = { cpu = \"x\" }", "").unwrap_err()[0],
            "backend.allocatable.cpu: \"x\" is not a CPU quantity: cores (\"0.5\", \"2\") or millicores (\"250m\")"
        );
    }

    #[test]
    fn run_keys_are_checked_with_paths() {
        let e = config(
            "type = \"docker\"",
            "image = \" \"\ncommand = [\"a\\u0000\"]\ncolour = \"red\"\nenv = { \"A=B\" = \"x\" }",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "services[0].colour: unknown key",
                "services[0].env: invalid variable name \"A=B\"",
                "services[0].image: must not be empty",
                "services[0].command: must not contain NUL characters",
            ]
        );
        let c = config(
            "type = \"docker\"",
            "image = \"nginx\"\nenv = { A = \"1\" }",
        )
        .unwrap();
        let run = c.services[0].workload.run().unwrap();
        assert_eq!(
            (run.image.as_deref(), run.env["A"].as_str()),
            (Some("nginx"), "1")
        );
    }

    #[test]
    fn a_swarm_service_may_reference_an_existing_one() {
        let c = config(
            "type = \"swarm\"",
            "[services.reference]\nservice = \"shop_web\"",
        )
        .unwrap();
        assert_eq!(
            c.services[0].workload,
            Workload::Reference(Reference::Swarm(swarm::SwarmReference {
                service: "shop_web".into()
            }))
        );
        assert_eq!(c.services[0].workload.run(), None);
        assert_eq!(
            c.services[0].workload.reference().unwrap().to_string(),
            "Swarm service shop_web"
        );
    }

    #[test]
    fn reference_errors_name_their_paths() {
        let e = config(
            "type = \"swarm\"",
            "image = \"nginx\"\n[services.reference]\ncolour = \"red\"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            vec![
                "services[0].image: a service with [services.reference] runs what the referenced \
                 object runs; remove this key (or the reference, to have microscaler create the \
                 object)",
                "services[0].reference.colour: unknown key",
                "services[0].reference.service: missing: the name of an existing Swarm service",
            ]
        );
        let e = config(
            "type = \"swarm\"",
            "[services.reference]\nservice = \"a b\"",
        )
        .unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("services[0].reference.service: \"a b\" is not a Swarm service name"),
            "{e:?}"
        );
        let e = config("type = \"swarm\"", "[services.reference]").unwrap_err();
        assert_eq!(
            e,
            vec!["services[0].reference.service: missing: the name of an existing Swarm service"]
        );
    }

    #[test]
    fn container_backends_refuse_references() {
        for backend in ["docker", "process"] {
            let e = config(
                &format!("type = \"{backend}\""),
                "[services.reference]\nservice = \"web\"",
            )
            .unwrap_err();
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].starts_with(&format!(
                    "services[0].reference: the {backend} backend creates its replicas itself"
                )),
                "{e:?}"
            );
        }
    }
}
