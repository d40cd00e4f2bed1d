// containerd's own conformance suites (Debian's containerd 1.6 sources) run against a
// containerd-compatible socket through containerd's gRPC proxies: the content suites
// (content/testsuite) over the Content service, the snapshotter suite
// (snapshots/testsuite) over the Snapshots service. Built with `go test -c` in GOPATH mode
// by tests/test_go_testsuites.py, run with -test.v; every case gets namespaces of its own.
//
// Environment: GOSUITES_ADDRESS (the socket), GOSUITES_PREFIX (a prefix for every
// namespace this run makes), GOSUITES_SNAPSHOTTER (default "overlayfs").
package gosuites

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/content"
	contentsuite "github.com/containerd/containerd/content/testsuite"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	snapshotsuite "github.com/containerd/containerd/snapshots/testsuite"
)

// counter numbers the namespaces of one run: each suite case, and each context a content
// case asks for, has one of its own.
var counter uint64

func address(t *testing.T) string {
	a := os.Getenv("GOSUITES_ADDRESS")
	if a == "" {
		t.Fatal("GOSUITES_ADDRESS is not set")
	}
	return a
}

func namespace(what string) string {
	n := atomic.AddUint64(&counter, 1)
	return fmt.Sprintf("%s%s-%d", os.Getenv("GOSUITES_PREFIX"), what, n)
}

func connect(t *testing.T) (*containerd.Client, error) {
	return containerd.New(address(t), containerd.WithTimeout(10*time.Second))
}

// contentStore: containerd's content proxy over the Content client; each context the
// suite derives is a fresh namespace under a lease of its own (as containerd's own
// integration tests run the suite against a daemon).
func contentStore(t *testing.T) contentsuite.StoreInitFn {
	return func(ctx context.Context, root string) (context.Context, content.Store, func() error, error) {
		client, err := connect(t)
		if err != nil {
			return nil, nil, nil, err
		}
		wrap := func(ctx context.Context) (context.Context, func(context.Context) error, error) {
			ctx = namespaces.WithNamespace(ctx, namespace("content"))
			return client.WithLease(ctx)
		}
		ctx = contentsuite.SetContextWrapper(ctx, wrap)
		return ctx, client.ContentStore(), client.Close, nil
	}
}

func TestContent(t *testing.T) {
	contentsuite.ContentSuite(t, "ContentClient", contentStore(t))
}

func TestContentCrossNSShared(t *testing.T) {
	contentsuite.ContentCrossNSSharedSuite(t, "ContentClient", contentStore(t))
}

func TestContentCrossNSIsolated(t *testing.T) {
	contentsuite.ContentCrossNSIsolatedSuite(t, "ContentClient", contentStore(t))
}

// isolated: a snapshotter whose every call runs in one namespace of its own (the suite
// puts every case in the namespace "testsuite", and runs them in parallel).
type isolated struct {
	sn snapshots.Snapshotter
	ns string
}

func (s isolated) in(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, s.ns)
}

func (s isolated) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	return s.sn.Stat(s.in(ctx), key)
}

func (s isolated) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	return s.sn.Update(s.in(ctx), info, fieldpaths...)
}

func (s isolated) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	return s.sn.Usage(s.in(ctx), key)
}

func (s isolated) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	return s.sn.Mounts(s.in(ctx), key)
}

func (s isolated) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.sn.Prepare(s.in(ctx), key, parent, opts...)
}

func (s isolated) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.sn.View(s.in(ctx), key, parent, opts...)
}

func (s isolated) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.sn.Commit(s.in(ctx), name, key, opts...)
}

func (s isolated) Remove(ctx context.Context, key string) error {
	return s.sn.Remove(s.in(ctx), key)
}

func (s isolated) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.sn.Walk(s.in(ctx), fn, filters...)
}

func (s isolated) Close() error {
	return s.sn.Close()
}

func TestSnapshotter(t *testing.T) {
	name := os.Getenv("GOSUITES_SNAPSHOTTER")
	if name == "" {
		name = "overlayfs"
	}
	snapshotsuite.SnapshotterSuite(t, name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		client, err := connect(t)
		if err != nil {
			return nil, nil, err
		}
		return isolated{sn: client.SnapshotService(name), ns: namespace("snapshots")}, client.Close, nil
	})
}
