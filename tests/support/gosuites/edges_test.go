package gosuites

// Checks of our own, beside containerd's suites, through the same proxies: what a refused
// or abandoned call leaves behind (containerd leaves nothing changed), and an ingest's
// times across a resume. Each passes against containerd 1.6 as against berth.

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func edgeStore(t *testing.T) (content.Store, func(string) context.Context) {
	client, err := connect(t)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	in := func(ns string) context.Context {
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 30*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	return client.ContentStore(), in
}

func noIngest(t *testing.T, ctx context.Context, cs content.Store, ref string) {
	t.Helper()
	if st, err := cs.Status(ctx, ref); !errdefs.IsNotFound(err) {
		t.Fatalf("ingest %q: want NotFound, got %+v, %v", ref, st, err)
	}
	statuses, err := cs.ListStatuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(statuses) != 0 {
		t.Fatalf("want no ingest, got %+v", statuses)
	}
}

// A writer opened in a second namespace on a blob of the first starts complete; closed
// without a commit, it records nothing there and leaves no ingest; opened again and
// committed, the blob is that namespace's too.
func TestEdgeAbandonedSharedWriter(t *testing.T) {
	cs, in := edgeStore(t)
	ns1, ns2 := namespace("edge"), namespace("edge")
	data := []byte("a blob both namespaces may share\n")
	desc := ocispec.Descriptor{Digest: digest.FromBytes(data), Size: int64(len(data))}
	labels := content.WithLabels(map[string]string{"containerd.io/gc.root": "edge"})
	if err := content.WriteBlob(in(ns1), cs, "shared", bytes.NewReader(data), desc, labels); err != nil {
		t.Fatal(err)
	}
	w, err := cs.Writer(in(ns2), content.WithRef("shared"), content.WithDescriptor(desc))
	if err != nil {
		t.Fatal(err)
	}
	st, err := w.Status()
	if err != nil || st.Offset != desc.Size || w.Digest() != desc.Digest {
		t.Fatalf("shared writer: %+v %v %s", st, err, w.Digest())
	}
	w.Close()
	time.Sleep(200 * time.Millisecond) // Close only half-closes the stream
	if _, err := cs.Info(in(ns2), desc.Digest); !errdefs.IsNotFound(err) {
		t.Fatalf("an abandoned shared writer recorded the blob: %v", err)
	}
	noIngest(t, in(ns2), cs, "shared")
	w, err = cs.Writer(in(ns2), content.WithRef("shared"), content.WithDescriptor(desc))
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(in(ns2), desc.Size, desc.Digest, labels); err != nil {
		t.Fatal(err)
	}
	if info, err := cs.Info(in(ns2), desc.Digest); err != nil || info.Size != desc.Size {
		t.Fatalf("committed shared blob: %+v %v", info, err)
	}
	noIngest(t, in(ns2), cs, "shared")
}

// A commit refused for its size or digest keeps the ingest as it was (offset, times) and
// stores nothing; the next writer resumes it, and an abort removes it.
func TestEdgeRefusedCommitKeepsTheIngest(t *testing.T) {
	cs, in := edgeStore(t)
	ctx := in(namespace("edge"))
	data := []byte("three bytes and some more\n")
	good := digest.FromBytes(data)
	w, err := cs.Writer(ctx, content.WithRef("kept"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	before, err := cs.Status(ctx, "kept")
	if err != nil {
		t.Fatal(err)
	}
	wrong := digest.FromBytes([]byte("other"))
	if err := w.Commit(ctx, int64(len(data)), wrong); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("wrong digest: want FailedPrecondition, got %v", err)
	}
	for _, d := range []digest.Digest{wrong, good} {
		if _, err := cs.Info(ctx, d); !errdefs.IsNotFound(err) {
			t.Fatalf("a refused commit stored %s: %v", d, err)
		}
	}
	after, err := cs.Status(ctx, "kept")
	if err != nil {
		t.Fatalf("a refused commit removed the ingest: %v", err)
	}
	if after.Offset != before.Offset || !after.StartedAt.Equal(before.StartedAt) || !after.UpdatedAt.Equal(before.UpdatedAt) {
		t.Fatalf("a refused commit changed the ingest: %+v -> %+v", before, after)
	}
	w, err = cs.Writer(ctx, content.WithRef("kept"))
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(ctx, int64(len(data))+1, ""); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("wrong size: want FailedPrecondition, got %v", err)
	}
	if st, err := cs.Status(ctx, "kept"); err != nil || st.Offset != before.Offset {
		t.Fatalf("a refused commit changed the ingest: %+v %v", st, err)
	}
	if err := cs.Abort(ctx, "kept"); err != nil {
		t.Fatal(err)
	}
	noIngest(t, ctx, cs, "kept")
}

// A resumed ingest reports the times of its first writer, on the writer and in Status.
func TestEdgeResumedIngestKeepsItsTimes(t *testing.T) {
	cs, in := edgeStore(t)
	ctx := in(namespace("edge"))
	preStart := time.Now()
	w, err := cs.Writer(ctx, content.WithRef("times"), content.WithDescriptor(ocispec.Descriptor{Size: 8}))
	if err != nil {
		t.Fatal(err)
	}
	postStart := time.Now()
	if _, err := w.Write([]byte("half")); err != nil {
		t.Fatal(err)
	}
	postWrite := time.Now()
	first, err := w.Status()
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	time.Sleep(1100 * time.Millisecond) // a resume a second later: its own times would show
	w, err = cs.Writer(ctx, content.WithRef("times"), content.WithDescriptor(ocispec.Descriptor{Size: 8}))
	if err != nil {
		t.Fatal(err)
	}
	resumed, err := w.Status()
	if err != nil {
		t.Fatal(err)
	}
	stored, err := cs.Status(ctx, "times")
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range []content.Status{resumed, stored} {
		if st.Offset != 4 || st.StartedAt.Before(preStart) || st.StartedAt.After(postStart) {
			t.Fatalf("resumed ingest: %+v, started between %s and %s", st, preStart, postStart)
		}
		if st.UpdatedAt.Before(postStart) || st.UpdatedAt.After(postWrite) || !st.UpdatedAt.Equal(first.UpdatedAt) {
			t.Fatalf("resumed ingest: %+v, updated between %s and %s (%s)", st, postStart, postWrite, first.UpdatedAt)
		}
	}
	// (closed first: berth makes an Abort wait for an open writer of the ingest, up to
	// 2 s, then answers Unavailable; containerd removes the ingest under the writer)
	w.Close()
	if err := cs.Abort(ctx, "times"); err != nil {
		t.Fatal(err)
	}
}
