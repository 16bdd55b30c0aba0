// Command harness runs KubeRay's own RayJob and RayCluster reconcilers (the ray-operator Go module named
// in go.mod, unmodified, in a controller-runtime manager as the operator's main sets them up) on the
// objects mzsane's chart renders, against a real kube-apiserver and etcd (tests/apiserver).
//
// Why: two hand-written emulations of the operator missed what it does (a duplicate port, an entrypoint
// the submitter breaks); running the operator's code against the API server's own validation, defaulting,
// CRD schema pruning, admission and watches leaves nothing to emulate but the kubelet and the Job controller.
//
//	harness reconcile -in rendered.yaml -out DIR -crds DIR [-kueue BIN -queues FILE]
//	    reconcile every RayJob until the operator has made its RayCluster, Pods, Services and submitter
//	    Job (and the harness, as the Job controller, its Pod); write them to DIR/objects.yaml and the RayJob
//	    status sequences to DIR/status.json.
//	harness run -in rendered.yaml -out DIR -crds DIR -work DIR [-kueue BIN -queues FILE] [-timeout 20m]
//	    also play the kubelet for real: start each container's command as a local process (see kubelet.go)
//	    and reconcile until every RayJob is Complete or Failed.
//
// The API server: etcd and kube-apiserver from -apiserver-bin (default: this binary's folder, where
// `scripts/install.sh harness` puts them), started by envtest on loopback ports; -crds names the folder of
// KubeRay's CRDs it installs. Every namespace of the input gets Pod Security "restricted" (enforce, audit,
// warn) and its "default" ServiceAccount; the input is created with strict field validation. What it
// refuses (a rendered object, a pod the operator or the Job controller makes) ends the harness with the
// server's message.
//
// Kueue: with -kueue (Kueue's own manager, sigs.k8s.io/kueue's cmd/kueue built by `scripts/install.sh
// kueue`; its CRDs from kueue-crds/ beside it go into the API server too) and -queues (a queue file such as
// deploy/kueue/queues.yaml), Kueue's controllers and scheduler run beside the reconcilers and admit a
// queued (suspended) RayJob by clearing spec.suspend when its ClusterQueue has quota (kueue.go). A RayJob
// Kueue does not admit stays Suspended; reconcile mode ends once each RayJob runs or Kueue has reported its
// Workload pending. Without -kueue nothing admits a suspended RayJob. Errors print one line and exit 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	kuberayconfig "github.com/ray-project/kuberay/ray-operator/apis/config/v1alpha1"
	rayv1 "github.com/ray-project/kuberay/ray-operator/apis/ray/v1"
	"github.com/ray-project/kuberay/ray-operator/controllers/ray/utils"
	"github.com/ray-project/kuberay/ray-operator/controllers/ray/utils/dashboardclient"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "reconcile" && os.Args[1] != "run") {
		fail(fmt.Errorf("usage: harness reconcile|run -in FILE -out DIR -crds DIR [-work DIR] [-kueue BIN -queues FILE] [-timeout D]"))
	}
	mode := os.Args[1]
	flags := flag.NewFlagSet(mode, flag.ExitOnError)
	in := flags.String("in", "", "multi-document YAML the chart rendered (ConfigMaps, Secrets, RayJobs)")
	out := flags.String("out", "", "folder for objects.yaml and status.json")
	work := flags.String("work", "", "run mode: folder for the pods' files and logs")
	timeout := flags.Duration("timeout", 2*time.Minute, "give up after this long")
	verbose := flags.Bool("v", false, "print the operator's own log lines")
	var forwards multiFlag
	flags.Var(&forwards, "forward", "run mode: NAME:PORT=HOST:PORT, the pods reach HOST:PORT as NAME:PORT (repeatable)")
	crds := flags.String("crds", "", "folder of KubeRay's CRD files (ray.io_rayjobs.yaml, ray.io_rayclusters.yaml)")
	kueueBin := flags.String("kueue", "", "Kueue's manager binary: Kueue admits queued RayJobs (its CRDs: kueue-crds/ beside it)")
	queues := flags.String("queues", "", "with -kueue: the Kueue queue file to apply (ResourceFlavor, ClusterQueue, LocalQueue)")
	apiserverBin := flags.String("apiserver-bin", "", "folder of the etcd and kube-apiserver binaries (default: beside this binary)")
	_ = flags.Parse(os.Args[2:])
	if *in == "" || *out == "" || *crds == "" || (mode == "run" && *work == "") {
		fail(fmt.Errorf("%s needs -in, -out and -crds%s", mode, map[bool]string{true: " and -work", false: ""}[mode == "run"]))
	}
	if (*kueueBin == "") != (*queues == "") {
		fail(fmt.Errorf("-kueue and -queues go together: Kueue's manager binary and the queue file it admits into"))
	}
	setupLogging(*verbose)

	// SIGTERM/SIGINT end the loop like the timeout does, so the pods and namespaces are cleaned up
	sigCtx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithTimeout(sigCtx, *timeout)
	defer cancel()
	if *apiserverBin == "" {
		self, err := os.Executable()
		if err != nil {
			fail(err)
		}
		*apiserverBin = filepath.Dir(self)
	}
	// first: the process kubelet below confines the default HTTP transport to pod addresses
	crdDirs := []string{*crds}
	if *kueueBin != "" {
		crdDirs = append(crdDirs, filepath.Join(filepath.Dir(*kueueBin), "kueue-crds"))
	}
	cp, err := startControlPlane(*apiserverBin, crdDirs...)
	if err != nil {
		fail(err)
	}
	defer cp.stop()
	var provider utils.ClientProvider = noDashboard{}
	var k kubelet = statusKubelet{}
	if mode == "run" {
		pk, err := newProcessKubelet(*work, forwards)
		if err != nil {
			cp.stop()
			fail(err)
		}
		// KubeRay's default ClientProvider: its real HTTP dashboard client, at the URL the operator builds
		// from the head Service; the process kubelet's dialer resolves that name to the head's address.
		provider, k = kuberayconfig.Configuration{}, pk
		defer pk.stopAll()
	}
	if err := run(ctx, cp, mode, *in, *out, *kueueBin, *queues, provider, k); err != nil {
		if pk, ok := k.(*processKubelet); ok {
			pk.stopAll()
		}
		cp.stop()
		fail(err)
	}
}

func run(ctx context.Context, cp *controlPlane, mode, in, out, kueueBin, queues string, provider utils.ClientProvider, k kubelet) error {
	h, err := newHarness(ctx, cp, in, provider)
	if err != nil {
		return err
	}
	h.kubelet = k
	if kueueBin != "" {
		h.kueueStart = func(ctx context.Context, namespaces []string) error {
			var err error
			if h.kueue, err = startKueue(kueueBin, filepath.Join(out, "kueue"), cp.cfg); err != nil {
				return err
			}
			return h.kueue.applyQueues(ctx, h.client, queues, namespaces)
		}
		defer func() { h.kueue.stop() }()
	}
	runErr := h.loop(ctx, mode)
	if err := h.write(out); err != nil {
		return err
	}
	return runErr
}

// noDashboard (reconcile mode): no Ray runs, so the RayJob reconciler's job-status queries fail at once
// instead of dialling the head Service's cluster DNS name.
type noDashboard struct{}

func (noDashboard) GetDashboardClient(context.Context, manager.Manager) func(*rayv1.RayCluster, string) (dashboardclient.RayDashboardClientInterface, error) {
	return func(*rayv1.RayCluster, string) (dashboardclient.RayDashboardClientInterface, error) {
		return nil, fmt.Errorf("reconcile mode runs no Ray dashboard")
	}
}

func (noDashboard) GetHttpProxyClient(manager.Manager) func(string, string, string, int) utils.RayHttpProxyClientInterface {
	return nil
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "harness: %v\n", err)
	os.Exit(1)
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
