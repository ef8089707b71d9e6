//! The contract between the core and its plugins (demand sources and backends).
//!
//! The core knows no source's or backend's options. It parses the parts of the configuration
//! that the engine uses (services, priorities, capacity, scaling rules) and hands every other
//! table to the plugin that owns it: a trigger's source keys to [`SourcePlugins::validate`], the
//! `[backend]` section to [`BackendPlugins::validate`], and a service's keys the core does not
//! know (`image`, `command`, `env`, `[services.reference]`, ...) to
//! [`BackendPlugins::workload`]. Each returns its typed options, reporting every error with its
//! path through the shared [`Validator`]. Validation is pure: no file, network, clock or
//! process is touched, so `microscaler validate` never connects anywhere.
//!
//! The plugins are closed enums in their own crates (`SourceConfig` in `microscaler-sources`,
//! `BackendConfig` in `microscaler-backends`), registered with one `match` each; the core is
//! generic over the pair, [`Plugins`] for `(S, B)`. [`opaque`] is a plugin set that keeps
//! every table as written, for tests and tools of the engine alone.

use std::fmt::Debug;

use crate::model::{Capacity, ServiceName};
use crate::validate::Validator;

/// What a source's validation may know about the rest of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SourceContext<'a> {
    /// The cluster's capacity, if its section is valid.
    pub capacity: Option<Capacity>,
    /// The trigger's service, if its name is valid.
    pub service: Option<&'a ServiceName>,
}

/// What a backend's validation of a service's own keys may know about the service.
#[derive(Debug, Clone, Copy)]
pub struct ServiceContext<'a> {
    /// The service's name, if valid.
    pub name: Option<&'a ServiceName>,
    /// Whether it is a one-per-host service (`per_host = true`).
    pub per_host: bool,
}

/// The demand sources, as one closed set (an enum of each source's options).
pub trait SourcePlugins: Debug + Clone + PartialEq + Send + Sync + 'static {
    /// The source types a trigger may name, listed in errors.
    const TYPES: &'static [&'static str];

    /// Validates the options of a trigger of source type `kind` (one of [`Self::TYPES`]):
    /// `options` is the trigger's table without the keys the rules use (`type`, `name`,
    /// `rule`, `target`, ...). Unknown keys are errors. Reports every error at its path under
    /// `path` (the trigger's, `services[0].triggers[1]`); `None` when the options cannot be
    /// built.
    fn validate(
        kind: &str,
        options: toml::Table,
        cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Self>;

    /// The source's type name, as written in the configuration.
    fn type_name(&self) -> &'static str;
}

/// Whether a stop has finished when a scale-down returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCompletion {
    /// The backend itself stops the replicas (container-level): when `scale` returns they are
    /// gone and their capacity is free.
    InScale,
    /// The backend sets a count and the orchestrator stops the replicas afterwards
    /// (service-level): capacity is free once the observation shows it.
    Converges,
}

/// What a backend can do, declared as data. The configuration check and the control loop use
/// these, never the backend's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The orchestrator keeps one replica per host by itself (Swarm global mode, a Kubernetes
    /// DaemonSet, an ECS DAEMON service): the control loop never scales per-host services.
    pub native_per_host: bool,
    /// Replicas can be paused and resumed (warm pools, `preempt = "pause"`).
    pub pause: bool,
    /// Hosts are reported with their CPUs and memory.
    pub host_resources: bool,
    /// When a scale-down's stops have finished.
    pub stops: StopCompletion,
    /// Services may reference an object that exists in the orchestrator
    /// (`[services.reference]`), whose count microscaler sets but which it never creates or
    /// deletes.
    pub references: bool,
}

impl Capabilities {
    /// A container-level backend that stops replicas itself and can do nothing more.
    pub const CONTAINER_LEVEL: Capabilities = Capabilities {
        native_per_host: false,
        pause: false,
        host_resources: false,
        stops: StopCompletion::InScale,
        references: false,
    };
}

/// The backends, as one closed set (an enum of each backend's options).
pub trait BackendPlugins: Debug + Clone + PartialEq + Send + Sync + 'static {
    /// A service's backend-specific part: what its replicas run (`image`, `command`, `env`),
    /// or which existing orchestrator object it is (`[services.reference]`).
    type Workload: Debug + Clone + PartialEq + Send + Sync + 'static;

    /// The backend types `[backend] type` may name, listed in errors.
    const TYPES: &'static [&'static str];

    /// Validates the `[backend]` section of type `kind` (one of [`Self::TYPES`]); `options`
    /// is the section without `type`. Unknown keys are errors.
    fn validate(kind: &str, options: toml::Table, v: &mut Validator, path: &str) -> Option<Self>;

    /// Validates the keys of a service's table that the core does not know (everything but
    /// `name`, `priority`, `min`, `max`, `max_step`, `remainder`, `per_host`, `triggers`,
    /// `stop_grace`, `scaling` and `pool`). `path` is the service's (`services[2]`).
    fn workload(
        &self,
        options: toml::Table,
        cx: &ServiceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<Self::Workload>;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// The backend's type name, as written in the configuration.
    fn type_name(&self) -> &'static str;
}

/// A set of plugins: the sources and the backends a configuration may use.
pub trait Plugins: Debug + Clone + PartialEq + Send + Sync + 'static {
    /// The sources.
    type Source: SourcePlugins;
    /// The backends.
    type Backend: BackendPlugins;
}

impl<S: SourcePlugins, B: BackendPlugins> Plugins for (S, B) {
    type Source = S;
    type Backend = B;
}

/// The workload type of a plugin set.
pub type WorkloadOf<P> = <<P as Plugins>::Backend as BackendPlugins>::Workload;

/// A plugin set that keeps each table as written: any source type, and the backend types
/// `docker`, `swarm` and `process` with the capabilities of the real ones. For tests,
/// benchmarks and tools of the engine alone, which need a configuration but no live plugin.
pub mod opaque {
    use super::*;

    /// The plugin set.
    pub type Opaque = (Source, Backend);

    /// A source kept as written: its type and its table.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Source {
        /// The source type.
        pub kind: String,
        /// Its options, unchecked.
        pub options: toml::Table,
    }

    impl Source {
        /// A source of type `kind` with no options.
        pub fn of(kind: &str) -> Self {
            Source {
                kind: kind.into(),
                options: toml::Table::new(),
            }
        }
    }

    impl SourcePlugins for Source {
        const TYPES: &'static [&'static str] = &[
            "random",
            "manual",
            "redis_list",
            "redis_stream",
            "rabbitmq",
            "prometheus",
            "http_json",
            "haproxy",
            "nginx",
            "nats_jetstream",
            "schedule",
            "docker_cpu",
            "sqs",
        ];

        fn validate(
            kind: &str,
            options: toml::Table,
            _: &SourceContext<'_>,
            _: &mut Validator,
            _: &str,
        ) -> Option<Self> {
            Some(Source {
                kind: kind.into(),
                options,
            })
        }

        fn type_name(&self) -> &'static str {
            Self::TYPES
                .iter()
                .find(|t| **t == self.kind)
                .copied()
                .unwrap_or("opaque")
        }
    }

    /// A backend kept as written.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Backend {
        /// The backend type.
        pub kind: &'static str,
        /// Its options, unchecked.
        pub options: toml::Table,
    }

    impl Backend {
        /// A backend of type `kind` (one of [`BackendPlugins::TYPES`]) with no options.
        pub fn of(kind: &str) -> Self {
            let kind = <Self as BackendPlugins>::TYPES
                .iter()
                .find(|t| **t == kind)
                .copied()
                .unwrap_or("process");
            Backend {
                kind,
                options: toml::Table::new(),
            }
        }
    }

    impl BackendPlugins for Backend {
        type Workload = toml::Table;
        const TYPES: &'static [&'static str] = &["docker", "swarm", "process"];

        fn validate(kind: &str, options: toml::Table, _: &mut Validator, _: &str) -> Option<Self> {
            let mut b = Backend::of(kind);
            b.options = options;
            Some(b)
        }

        fn workload(
            &self,
            options: toml::Table,
            _: &ServiceContext<'_>,
            _: &mut Validator,
            _: &str,
        ) -> Option<toml::Table> {
            Some(options)
        }

        fn capabilities(&self) -> Capabilities {
            match self.kind {
                "docker" => Capabilities {
                    pause: true,
                    host_resources: true,
                    ..Capabilities::CONTAINER_LEVEL
                },
                "swarm" => Capabilities {
                    native_per_host: true,
                    pause: false,
                    host_resources: true,
                    stops: StopCompletion::Converges,
                    references: true,
                },
                _ => Capabilities::CONTAINER_LEVEL,
            }
        }

        fn type_name(&self) -> &'static str {
            self.kind
        }
    }
}
