// Command etcd is etcd's own server (go.etcd.io/etcd/server/v3, the release k8s.io/kubernetes requires),
// for the kube-apiserver beside it: Debian's etcd (3.4) is older than Kubernetes 1.36 supports.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
