// Command kube-apiserver is Kubernetes' own API server (k8s.io/kubernetes, the version go.mod pins),
// unmodified: the KubeRay harness starts it (through controller-runtime's envtest) so that validation,
// defaulting, CRD pruning, admission (Pod Security) and watches are the real server's.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
