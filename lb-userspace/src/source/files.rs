//! The YAML files source (being written).
