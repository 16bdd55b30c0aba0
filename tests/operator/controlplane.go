package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// controlPlane is a real etcd and kube-apiserver (tests/apiserver builds both from their Go modules),
// started by controller-runtime's envtest, which writes their certificates, service-account keys and
// flags. So what the chart renders and what the operator makes meets the API server's own validation,
// defaulting, CRD schema pruning, admission and watches, not an emulation of them.
//
// Admission: the API server's default plugins, ServiceAccount included (envtest turns it off by default
// because no controller makes the "default" ServiceAccount; the harness makes it, see prepareNamespace),
// and Pod Security "restricted" on every namespace the input uses. There is no kube-controller-manager:
// no garbage collector, no Job controller (the kubelets play that part), no quota controller.
type controlPlane struct {
	env *envtest.Environment
	cfg *rest.Config
}

// podSecurity: what `kubectl label ns` would set for a namespace that runs mzsane's sweeps.
var podSecurity = map[string]string{
	"pod-security.kubernetes.io/enforce": "restricted",
	"pod-security.kubernetes.io/audit":   "restricted",
	"pod-security.kubernetes.io/warn":    "restricted",
}

// binDir: where etcd and kube-apiserver are; -apiserver-bin, else beside the harness binary.
func startControlPlane(binDir string, crds ...string) (*controlPlane, error) {
	for _, name := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(binDir, name)); err != nil {
			return nil, fmt.Errorf("no %s in %s: run `scripts/install.sh apiserver` (or pass -apiserver-bin)", name, binDir)
		}
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory:    binDir,
		CRDDirectoryPaths:        crds,
		ErrorIfCRDPathMissing:    true,
		ControlPlaneStartTimeout: 2 * time.Minute,
		ControlPlaneStopTimeout:  30 * time.Second,
		// envtest waits 10 s by default for the CRDs to be served; Kueue's eleven beside KubeRay's two
		// take longer than that on a loaded 2-core machine
		CRDInstallOptions: envtest.CRDInstallOptions{MaxTime: 2 * time.Minute},
	}
	env.ControlPlane.GetAPIServer().Configure().Disable("disable-admission-plugins")
	start := time.Now()
	cfg, err := env.Start()
	if err != nil {
		_ = env.Stop()
		return nil, fmt.Errorf("starting etcd and kube-apiserver from %s: %w", binDir, err)
	}
	progress("kube-apiserver and etcd up in %.1fs (%s)", time.Since(start).Seconds(), env.ControlPlane.APIServer.SecureServing.URL("https", "/"))
	cfg.QPS, cfg.Burst = 500, 1000 // one client per reconciler here: client-go's default throttle only slows the test
	return &controlPlane{env: env, cfg: cfg}, nil
}

func (cp *controlPlane) stop() {
	if err := cp.env.Stop(); err != nil {
		progress("stopping the control plane: %v", err)
	}
}

// prepareNamespace makes the namespace (or labels an existing one) with Pod Security "restricted", and
// its "default" ServiceAccount, which kube-controller-manager would make and the ServiceAccount admission
// plugin requires of every Pod that names none.
func prepareNamespace(ctx context.Context, c client.Client, name string) error {
	var ns corev1.Namespace
	err := c.Get(ctx, client.ObjectKey{Name: name}, &ns)
	switch {
	case apierrors.IsNotFound(err):
		ns = corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: podSecurity}}
		err = c.Create(ctx, &ns)
	case err == nil:
		if ns.Labels == nil {
			ns.Labels = map[string]string{}
		}
		for k, v := range podSecurity {
			ns.Labels[k] = v
		}
		err = c.Update(ctx, &ns)
	}
	if err != nil {
		return fmt.Errorf("namespace %s: %w", name, err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: name}}
	if err := c.Create(ctx, sa); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("namespace %s: default ServiceAccount: %w", name, err)
	}
	return nil
}

// scrub drops what the server keeps for itself from an object written out (managed fields): the tests
// read objects as a client would send them.
func scrub(o client.Object) {
	o.SetManagedFields(nil)
}
