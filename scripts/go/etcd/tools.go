// Package tools only exists so that `go build` can name the etcd server
// command of the pinned release; see scripts/lib/kubernetes.sh.
package tools
