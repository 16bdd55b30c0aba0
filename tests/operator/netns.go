package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// podNetwork gives each local pod a network namespace of its own, as Kubernetes does: eth0 with
// 10.244.0.N/24 (kind's pod range), bridged (br0, 10.244.0.1) inside a namespace the harness made, with a
// default route there so Ray's own address detection finds eth0. The namespaces live as long as the
// harness (close deletes them); no address in them is reachable from, or routed to, the host's network.
type podNetwork struct {
	prefix  string
	bridge  string // netns name
	gateway string
	mu      sync.Mutex
	netns   []string
	lis     []net.Listener
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func newPodNetwork() (*podNetwork, error) {
	removeStale()
	pn := &podNetwork{prefix: fmt.Sprintf("mzh%d", os.Getpid()), gateway: "10.244.0.1"}
	pn.bridge = pn.prefix + "b"
	steps := [][]string{
		{"netns", "add", pn.bridge},
		{"-n", pn.bridge, "link", "set", "lo", "up"},
		{"-n", pn.bridge, "link", "add", "br0", "type", "bridge"},
		{"-n", pn.bridge, "addr", "add", pn.gateway + "/24", "dev", "br0"},
		{"-n", pn.bridge, "link", "set", "br0", "up"},
	}
	pn.netns = append(pn.netns, pn.bridge)
	for _, s := range steps {
		if err := ipCmd(s...); err != nil {
			pn.close()
			return nil, fmt.Errorf("run mode makes network namespaces (root needed): %w", err)
		}
	}
	return pn, nil
}

// add makes pod n's namespace and gives lp its address.
func (pn *podNetwork) add(lp *localPod, n int) error {
	ns, veth := fmt.Sprintf("%sp%d", pn.prefix, n), fmt.Sprintf("v%d", n)
	ip := fmt.Sprintf("10.244.0.%d", n)
	pn.mu.Lock()
	pn.netns = append(pn.netns, ns)
	pn.mu.Unlock()
	for _, s := range [][]string{
		{"netns", "add", ns},
		{"-n", pn.bridge, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"-n", pn.bridge, "link", "set", veth, "master", "br0"},
		{"-n", pn.bridge, "link", "set", veth, "up"},
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "addr", "add", ip + "/24", "dev", "eth0"},
		{"-n", ns, "link", "set", "eth0", "up"},
		{"-n", ns, "route", "add", "default", "via", pn.gateway},
	} {
		if err := ipCmd(s...); err != nil {
			return err
		}
	}
	lp.ip, lp.netns = ip, ns
	return nil
}

func (pn *podNetwork) contains(host string) bool {
	ip := net.ParseIP(host)
	return ip != nil && ip.To4() != nil && strings.HasPrefix(ip.String(), "10.244.0.")
}

// inBridge runs fn on an OS thread switched into the bridge namespace: sockets made there stay there.
func (pn *podNetwork) inBridge(fn func() error) error {
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer self.Close()
	target, err := os.Open("/var/run/netns/" + pn.bridge)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	fnErr := fn()
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		return err // the thread stays locked and dies with its goroutine: never reused in the wrong namespace
	}
	runtime.UnlockOSThread()
	return fnErr
}

func (pn *podNetwork) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := pn.inBridge(func() error {
		var err error
		conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// forward serves "NAME:PORT=TARGET": the pods reach TARGET (an address on the host, e.g. the S3 server)
// as NAME:PORT, NAME resolving to the bridge's address.
func (pn *podNetwork) forward(spec string) (name, target string, err error) {
	left, target, ok := strings.Cut(spec, "=")
	name, port, err2 := net.SplitHostPort(left)
	if !ok || err2 != nil {
		return "", "", fmt.Errorf("-forward %q: write NAME:PORT=HOST:PORT", spec)
	}
	var lis net.Listener
	if err := pn.inBridge(func() error {
		var err error
		lis, err = net.Listen("tcp", net.JoinHostPort(pn.gateway, port))
		return err
	}); err != nil {
		return "", "", err
	}
	pn.lis = append(pn.lis, lis)
	go func() {
		for {
			in, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer out.Close()
				go func() { _, _ = io.Copy(out, in) }()
				_, _ = io.Copy(in, out)
			}()
		}
	}()
	return name, target, nil
}

// removeStale deletes the namespaces of harnesses that died without closing (killed by a timeout).
func removeStale() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		var pid int
		var rest string
		if n, _ := fmt.Sscanf(name, "mzh%d%s", &pid, &rest); n < 1 {
			continue
		}
		if err := unix.Kill(pid, 0); err == unix.ESRCH {
			_ = ipCmd("netns", "del", name)
		}
	}
}

// remove deletes one pod's namespace once its processes are gone.
func (pn *podNetwork) remove(lp *localPod) {
	if lp.netns == "" {
		return
	}
	_ = ipCmd("netns", "del", lp.netns)
	pn.mu.Lock()
	defer pn.mu.Unlock()
	for i, ns := range pn.netns {
		if ns == lp.netns {
			pn.netns = append(pn.netns[:i], pn.netns[i+1:]...)
			break
		}
	}
}

func (pn *podNetwork) close() {
	for _, l := range pn.lis {
		_ = l.Close()
	}
	pn.mu.Lock()
	defer pn.mu.Unlock()
	for i := len(pn.netns) - 1; i >= 0; i-- {
		_ = ipCmd("netns", "del", pn.netns[i])
	}
	pn.netns = nil
}
