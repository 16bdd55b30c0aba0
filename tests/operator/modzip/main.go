// Command modzip makes a Go module zip from a git tag, exactly as the Go module proxy would (same files, so
// the same h1: hash that go.sum and the checksum database hold): ray-operator v1.7.0, which the proxy
// reachable here refuses to serve, goes into a file proxy folder (scripts/kuberay-goproxy.sh).
package main

import (
	"os"

	"golang.org/x/mod/module"
	"golang.org/x/mod/zip"
)

// usage: modzip REPO_ROOT REVISION SUBDIR MODPATH VERSION OUT.zip
func main() {
	a := os.Args[1:]
	out, err := os.Create(a[5])
	if err != nil {
		panic(err)
	}
	defer out.Close()
	if err := zip.CreateFromVCS(out, module.Version{Path: a[3], Version: a[4]}, a[0], a[1], a[2]); err != nil {
		panic(err)
	}
}
