// Package tools only exists so that `go build` can name the control-plane
// commands of the pinned Kubernetes release; see scripts/lib/kubernetes.sh.
package tools
