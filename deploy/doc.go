// Package deploy holds no code: its tests check the deployment files next
// to it (Kubernetes manifests, the systemd unit, the container image
// definition) against the Kubernetes API types, systemd's own verifier and
// the agent's configuration schema.
package deploy
