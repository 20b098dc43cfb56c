//! The Kubernetes API source (being written).
