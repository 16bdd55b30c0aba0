package main

// What a local pod sees: its files (volumes, /etc/hosts), its environment, and the script that sets up its
// namespaces and runs its containers. The lifecycle around it (start, probe, stop) is process.go's.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// writeHosts (re)writes a pod's /etc/hosts in place (the file is bind-mounted into the pod's namespace).
func (k *processKubelet) writeHosts(lp *localPod) error {
	if lp.dir == "" || lp.ip == "" {
		return nil
	}
	k.mu.Lock()
	names := make([]string, 0, len(k.hosts))
	for name := range k.hosts {
		names = append(names, name)
	}
	sort.Strings(names)
	var hosts strings.Builder
	hosts.WriteString("127.0.0.1 localhost\n" + lp.ip + " " + lp.hostname + "\n")
	for _, name := range names {
		hosts.WriteString(k.hosts[name] + " " + name + "\n")
	}
	k.mu.Unlock()
	if hosts.String() == lp.hosts {
		return nil
	}
	lp.hosts = hosts.String()
	f, err := os.OpenFile(filepath.Join(lp.dir, "hosts"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(lp.hosts); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// start writes the pod's volumes and /etc/hosts under its folder and starts its init containers, then its
// first container, in one mount+PID namespace; the process's exit code is the pod's.
func (k *processKubelet) start(ctx context.Context, c client.Client, lp *localPod, ns string, meta metav1.ObjectMeta, spec *corev1.PodSpec) error {
	if err := os.MkdirAll(lp.dir, 0o755); err != nil {
		return err
	}
	var mounts []string // "source:target" bind mounts, in order
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	containers := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers[0])
	seen := map[string]bool{}
	for _, ctr := range containers {
		for _, m := range ctr.VolumeMounts {
			if seen[m.MountPath] || m.MountPath == "/dev/shm" {
				continue
			}
			seen[m.MountPath] = true
			src := filepath.Join(lp.dir, "volumes", m.Name)
			if err := os.MkdirAll(src, 0o777); err != nil {
				return err
			}
			v := volumes[m.Name]
			files := map[string][]byte{}
			switch {
			case v.ConfigMap != nil:
				var cm corev1.ConfigMap
				if err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: v.ConfigMap.Name}, &cm); err != nil {
					return fmt.Errorf("volume %s: %w", m.Name, err)
				}
				for name, data := range cm.Data {
					files[name] = []byte(data)
				}
			case v.Secret != nil:
				var sec corev1.Secret
				if err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: v.Secret.SecretName}, &sec); err != nil {
					return fmt.Errorf("volume %s: %w", m.Name, err)
				}
				files = sec.Data
			case v.Projected != nil: // the ServiceAccount admission's API token: nothing here talks to the API
			case v.EmptyDir == nil:
				return fmt.Errorf("volume %s: only configMap, secret, projected and emptyDir volumes run locally", m.Name)
			}
			for name, data := range files {
				if err := os.WriteFile(filepath.Join(src, name), data, 0o644); err != nil {
					return err
				}
			}
			mounts = append(mounts, src+":"+m.MountPath)
		}
	}
	// mounts over /tmp last: their sources may live under /tmp
	sort.SliceStable(mounts, func(i, j int) bool {
		return !strings.HasSuffix(mounts[i], ":/tmp") && strings.HasSuffix(mounts[j], ":/tmp")
	})
	lp.hostname, lp.hosts = meta.Name, ""
	if err := k.writeHosts(lp); err != nil {
		return err
	}
	var script strings.Builder // runs as root inside the namespace, then execs the containers
	script.WriteString("set -e\nmount -t tmpfs tmpfs \"$POD/ns\"\nmkdir -p \"$POD/ns/u\" \"$POD/ns/w\"\n" +
		"mount -t overlay overlay -o lowerdir=/etc,upperdir=\"$POD/ns/u\",workdir=\"$POD/ns/w\" /etc\n" +
		"mount --bind \"$POD/hosts\" /etc/hosts\nhostname \"$POD_NAME\"\n")
	for _, m := range mounts {
		src, dst, _ := strings.Cut(m, ":")
		script.WriteString(fmt.Sprintf("mkdir -p %q && mount --bind %q %q\n", dst, src, dst))
	}
	script.WriteString("cd /\n")
	for i, ctr := range containers {
		env, err := k.env(ctx, c, ns, meta, lp.ip, ctr)
		if err != nil {
			return fmt.Errorf("container %s: %w", ctr.Name, err)
		}
		argv := append(append([]string{}, ctr.Command...), ctr.Args...)
		line := "env -i"
		for _, e := range env {
			line += " " + shellQuote(e)
		}
		for _, a := range argv {
			line += " " + shellQuote(a)
		}
		if i == len(containers)-1 {
			line = "exec " + line
		}
		script.WriteString(line + "\n")
	}
	if err := os.WriteFile(filepath.Join(lp.dir, "pod.sh"), []byte(script.String()), 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(lp.dir, "ns"), 0o755); err != nil {
		return err
	}
	log, err := os.Create(filepath.Join(lp.dir, "log"))
	if err != nil {
		return err
	}
	cmd := exec.Command("ip", "netns", "exec", lp.netns, "unshare", "--uts", "--mount", "--propagation", "private", "--pid",
		"--fork", "--kill-child", "--mount-proc", "/bin/bash", filepath.Join(lp.dir, "pod.sh"))
	cmd.Env = append(os.Environ(), "POD="+lp.dir, "POD_NAME="+meta.Name)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	lp.cmd, lp.done = cmd, make(chan struct{})
	progress("pod %s: started on %s (%s)", meta.Name, lp.ip, filepath.Join(lp.dir, "log"))
	go func() {
		_ = cmd.Wait()
		lp.exitCode = cmd.ProcessState.ExitCode()
		_ = log.Close()
		close(lp.done)
	}()
	return nil
}

// env resolves a container's environment as the kubelet does, on top of the harness's PATH and PYTHONPATH
// (the image's Python environment here is the one the tests run in). GRPC_DNS_RESOLVER=native: there is
// no cluster DNS server here, names resolve through /etc/hosts, which gRPC's default (c-ares) resolver
// does not read, so Ray's GCS clients would never find the head Service.
func (k *processKubelet) env(ctx context.Context, c client.Client, ns string, meta metav1.ObjectMeta, ip string, ctr corev1.Container) ([]string, error) {
	env := []string{"GRPC_DNS_RESOLVER=native"}
	for _, name := range []string{"PATH", "PYTHONPATH", "LANG", "VIRTUAL_ENV", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} {
		if v, ok := os.LookupEnv(name); ok {
			env = append(env, name+"="+v)
		}
	}
	for _, e := range ctr.Env {
		value := e.Value
		if src := e.ValueFrom; src != nil {
			switch {
			case src.FieldRef != nil:
				value = fieldValue(src.FieldRef.FieldPath, ns, meta, ip)
			case src.SecretKeyRef != nil:
				var sec corev1.Secret
				if err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: src.SecretKeyRef.Name}, &sec); err != nil {
					return nil, fmt.Errorf("env %s: %w", e.Name, err)
				}
				value = string(sec.Data[src.SecretKeyRef.Key])
			case src.ConfigMapKeyRef != nil:
				var cm corev1.ConfigMap
				if err := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: src.ConfigMapKeyRef.Name}, &cm); err != nil {
					return nil, fmt.Errorf("env %s: %w", e.Name, err)
				}
				value = cm.Data[src.ConfigMapKeyRef.Key]
			case src.ResourceFieldRef != nil:
				value = "0"
			}
		}
		env = append(env, e.Name+"="+value) // the chart uses no $(VAR) references
	}
	return env, nil
}

var labelRef = regexp.MustCompile(`^metadata\.labels\['(.+)'\]$`)

func fieldValue(path, ns string, meta metav1.ObjectMeta, ip string) string {
	switch path {
	case "metadata.name":
		return meta.Name
	case "metadata.namespace":
		return ns
	case "status.podIP", "status.hostIP":
		return ip
	}
	if m := labelRef.FindStringSubmatch(path); m != nil {
		return meta.Labels[m[1]]
	}
	return ""
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
