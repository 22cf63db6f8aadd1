//! The AKD configuration chosen at run time: `whatsapp_v1` (default, what public auditors
//! verify today) or `experimental:<domain label>`.
//!
//! akd's `ExperimentalConfiguration<L>` takes its domain label from a type, so the label read
//! from configuration is installed once per process in [`RuntimeDomainLabel`]. A process serves
//! one directory, so one label; installing a different one is an error, never a silent switch.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use akd_core::configuration::{DomainLabel, ExperimentalConfiguration, WhatsAppV1Configuration};

use crate::error::{Error, Result};

/// akd's `WhatsAppV1Configuration`.
pub type WhatsAppV1 = WhatsAppV1Configuration;

/// akd's `ExperimentalConfiguration` with the process's configured domain label.
pub type Experimental = ExperimentalConfiguration<RuntimeDomainLabel>;

static DOMAIN_LABEL: OnceLock<Box<[u8]>> = OnceLock::new();

/// The domain label installed by [`AkdConfig::install`] (empty until then).
#[derive(Clone, Copy, Debug)]
pub struct RuntimeDomainLabel;

impl DomainLabel for RuntimeDomainLabel {
    fn domain_label() -> &'static [u8] {
        DOMAIN_LABEL.get().map(|label| &label[..]).unwrap_or(b"")
    }
}

/// Which hash and commitment scheme a directory uses. Fixed for the directory's life.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum AkdConfig {
    /// `WhatsAppV1Configuration`.
    #[default]
    WhatsAppV1,
    /// `ExperimentalConfiguration` with this domain label.
    Experimental {
        /// The domain-separation label prefixed to every hash input.
        domain_label: String,
    },
}

impl AkdConfig {
    /// Makes this configuration usable in this process (installs the experimental domain
    /// label). Fails if another domain label is already installed.
    pub fn install(&self) -> Result<()> {
        if let AkdConfig::Experimental { domain_label } = self {
            if domain_label.is_empty() {
                return Err(Error::InvalidConfig(
                    "the experimental domain label must not be empty".into(),
                ));
            }
            let installed = DOMAIN_LABEL.get_or_init(|| domain_label.as_bytes().into());
            if &installed[..] != domain_label.as_bytes() {
                return Err(Error::InvalidConfig(format!(
                    "this process already serves domain label {:?}; cannot also serve {domain_label:?}",
                    String::from_utf8_lossy(installed)
                )));
            }
        }
        Ok(())
    }
}

/// Evaluates `$body` with `$tc` naming the akd configuration type of `$config` (an
/// [`AkdConfig`]): the one place a run-time configuration becomes a type parameter.
///
/// ```
/// use ktd_core::{AkdConfig, with_configuration};
/// use ktd_core::akd_core::configuration::Configuration;
///
/// fn empty_root<TC: Configuration>() -> [u8; 32] {
///     ktd_core::stitch::TopTree::<TC>::new(0, vec![None]).expect("one partition").root_hash()
/// }
/// let root = with_configuration!(&AkdConfig::WhatsAppV1, TC => empty_root::<TC>());
/// assert_eq!(root.len(), 32);
/// ```
#[macro_export]
macro_rules! with_configuration {
    ($config:expr, $tc:ident => $body:expr) => {
        match $config {
            $crate::config::AkdConfig::WhatsAppV1 => {
                type $tc = $crate::config::WhatsAppV1;
                $body
            }
            $crate::config::AkdConfig::Experimental { .. } => {
                type $tc = $crate::config::Experimental;
                $body
            }
        }
    };
}

impl fmt::Display for AkdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AkdConfig::WhatsAppV1 => f.write_str("whatsapp_v1"),
            AkdConfig::Experimental { domain_label } => write!(f, "experimental:{domain_label}"),
        }
    }
}

impl FromStr for AkdConfig {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.split_once(':') {
            None if text == "whatsapp_v1" => Ok(AkdConfig::WhatsAppV1),
            Some(("experimental", domain_label)) if !domain_label.is_empty() => {
                Ok(AkdConfig::Experimental {
                    domain_label: domain_label.to_string(),
                })
            }
            _ => Err(Error::InvalidConfig(format!(
                "unknown configuration {text:?}: expected \"whatsapp_v1\" or \"experimental:<domain label>\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for text in ["whatsapp_v1", "experimental:ExampleLabel"] {
            assert_eq!(text.parse::<AkdConfig>().expect("valid").to_string(), text);
        }
        for bad in ["", "whatsapp", "experimental", "experimental:", "sha256"] {
            assert!(bad.parse::<AkdConfig>().is_err(), "{bad} must be rejected");
        }
    }
}
