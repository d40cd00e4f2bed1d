// Storage-side flows: what the Go client does with content, images, leases, snapshots,
// diffs, namespaces and archives (a pull with unpack, as nerdctl and BuildKit do it).
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/archive/compression"
	"github.com/containerd/containerd/cio"
	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/diff"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/images/archive"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/oci"
	"github.com/containerd/containerd/platforms"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

const snapshotter = "overlayfs"

func init() {
	flows["pull-unpack-run"] = flowPullUnpackRun
	flows["content"] = flowContent
	flows["content-resume"] = flowContentResume
	flows["leases"] = flowLeases
	flows["images"] = flowImages
	flows["snapshots-diff"] = flowSnapshotsDiff
	flows["introspection"] = flowIntrospection
	flows["namespaces"] = flowNamespaces
	flows["export-import"] = flowExportImport
}

// expect fails the flow unless err is what `want` says (errdefs' classes, as clients test).
func expect(step string, err error, want func(error) bool, what string) {
	if err == nil || !want(err) {
		fail(step, fmt.Errorf("want %s, got %v", what, err))
	}
}

// flowPullUnpackRun: Pull with unpack from a plain-HTTP registry (GOCLIENT_REF), then a
// container on a new snapshot of the image, with its image config, and its output.
func flowPullUnpackRun(ctx context.Context, client *containerd.Client, address, rootfs string) {
	ref := os.Getenv("GOCLIENT_REF")
	resolver := docker.NewResolver(docker.ResolverOptions{PlainHTTP: true})
	unleased := ctx
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		fail("WithLease", err)
	}
	cleanups = append(cleanups, func() { done(unleased) }) // a second time: not found, ignored
	image, err := client.Pull(ctx, ref, containerd.WithPullUnpack, containerd.WithResolver(resolver),
		containerd.WithPullSnapshotter(snapshotter))
	if err != nil {
		fail("Pull", err)
	}
	unpacked, err := image.IsUnpacked(ctx, snapshotter)
	if err != nil || !unpacked {
		fail("IsUnpacked", fmt.Errorf("%v %v", unpacked, err))
	}
	size, err := image.Size(ctx)
	if err != nil || size <= 0 {
		fail("Size", fmt.Errorf("%d %v", size, err))
	}
	if _, err := image.Config(ctx); err != nil {
		fail("Config", err)
	}
	diffIDs, err := image.RootFS(ctx)
	if err != nil || len(diffIDs) == 0 {
		fail("RootFS", fmt.Errorf("%v %v", diffIDs, err))
	}
	if _, err := image.Usage(ctx, containerd.WithSnapshotUsage()); err != nil {
		fail("Usage", err)
	}
	// pulled again: everything is there already (content exists, layers unpacked)
	again, err := client.Pull(ctx, ref, containerd.WithPullUnpack, containerd.WithResolver(resolver),
		containerd.WithPullSnapshotter(snapshotter))
	if err != nil || again.Target().Digest != image.Target().Digest {
		fail("Pull again", err)
	}
	container, err := client.NewContainer(ctx, "go-pulled",
		containerd.WithImage(image),
		containerd.WithSnapshotter(snapshotter),
		containerd.WithNewSnapshot("go-pulled-snap", image),
		containerd.WithNewSpec(oci.WithImageConfig(image), oci.WithProcessArgs("cat", "/hello")))
	if err != nil {
		fail("NewContainer", err)
	}
	cleanups = append(cleanups, func() { container.Delete(unleased, containerd.WithSnapshotCleanup) })
	// stdout and stderr into buffers of their own: the client copies each in a goroutine
	// of its own, and bytes.Buffer is not safe for two (one buffer loses output).
	var out, errs bytes.Buffer
	task, err := container.NewTask(ctx, newCreator(cio.WithStreams(nil, &out, &errs)))
	if err != nil {
		fail("NewTask", err)
	}
	cleanups = append(cleanups, func() { task.Delete(unleased, containerd.WithProcessKill) })
	status, err := task.Wait(ctx)
	if err != nil {
		fail("Wait", err)
	}
	if err := task.Start(ctx); err != nil {
		fail("Start", err)
	}
	exit := <-status
	if _, err := task.Delete(ctx); err != nil { // waits for the output to be copied
		fail("task Delete", err)
	}
	if exit.ExitCode() != 0 || out.String() != "hello from the registry\n" || errs.Len() != 0 {
		fail("run", fmt.Errorf("status %d, output %q, errors %q", exit.ExitCode(), out.String(), errs.String()))
	}
	if err := container.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		fail("container Delete", err)
	}
	if _, err := client.SnapshotService(snapshotter).Stat(ctx, "go-pulled-snap"); !errdefs.IsNotFound(err) {
		fail("snapshot cleaned up", fmt.Errorf("want not found, got %v", err))
	}
	// the unpacked layers are snapshots named by chain ID, held for the image by labels
	chainID := identity.ChainID(diffIDs).String()
	if _, err := client.SnapshotService(snapshotter).Stat(ctx, chainID); err != nil {
		fail("the unpacked top layer's snapshot", err)
	}
	if err := done(unleased); err != nil { // the pull's lease: only the image holds things now
		fail("delete the lease", err)
	}
	ctx = unleased
	if err := client.ImageService().Delete(ctx, image.Name(), images.SynchronousDelete()); err != nil {
		fail("image Delete", err)
	}
	if _, err := client.GetImage(ctx, image.Name()); !errdefs.IsNotFound(err) {
		fail("GetImage after Delete", fmt.Errorf("want not found, got %v", err))
	}
	if _, err := client.SnapshotService(snapshotter).Stat(ctx, chainID); !errdefs.IsNotFound(err) {
		fail("the image's snapshots collected", fmt.Errorf("want not found, got %v", err))
	}
	if _, err := client.ContentStore().Info(ctx, image.Target().Digest); !errdefs.IsNotFound(err) {
		fail("the image's content collected", fmt.Errorf("want not found, got %v", err))
	}
}

// flowContentResume: an ingest cut after 300 kB and closed; a writer opened again on the
// same ref sees the offset, and content.Copy resumes from it to a verified blob.
func flowContentResume(ctx context.Context, client *containerd.Client, address, rootfs string) {
	// under a lease, as a containerd client must: committed content that nothing
	// references may be collected by a GC that other tests' deletions set off
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		fail("WithLease", err)
	}
	defer done(ctx)
	cs := client.ContentStore()
	data := bytes.Repeat([]byte("0123456789abcdef"), 64*1024)
	desc := ocispec.Descriptor{MediaType: "application/octet-stream", Digest: digest.FromBytes(data), Size: int64(len(data))}
	w, err := content.OpenWriter(ctx, cs, content.WithRef("goclient-resume"), content.WithDescriptor(desc))
	if err != nil {
		fail("OpenWriter", err)
	}
	if _, err := w.Write(data[:300000]); err != nil {
		fail("Write", err)
	}
	w.Close()
	w, err = content.OpenWriter(ctx, cs, content.WithRef("goclient-resume"), content.WithDescriptor(desc))
	if err != nil {
		fail("OpenWriter again", err)
	}
	status, err := w.Status()
	if err != nil || status.Offset != 300000 || status.Total != desc.Size {
		fail("Status of the resumed ingest", fmt.Errorf("%+v %v", status, err))
	}
	if err := content.Copy(ctx, w, bytes.NewReader(data), desc.Size, desc.Digest); err != nil {
		fail("Copy (resumed)", err)
	}
	info, err := cs.Info(ctx, desc.Digest)
	if err != nil || info.Size != desc.Size {
		fail("Info", fmt.Errorf("%+v %v", info, err))
	}
	if err := cs.Delete(ctx, desc.Digest); err != nil {
		fail("Delete", err)
	}
}

// flowContent: a blob written through an ingest, its info, labels updated by field path,
// a walk filtered by label, read back at an offset, an aborted ingest, a delete.
func flowContent(ctx context.Context, client *containerd.Client, address, rootfs string) {
	cs := client.ContentStore()
	data := []byte("some content the Go client wrote\n")
	desc := ocispec.Descriptor{MediaType: "application/octet-stream", Digest: digest.FromBytes(data), Size: int64(len(data))}
	labels := map[string]string{"goclient": "yes", "containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339)}
	if err := content.WriteBlob(ctx, cs, "goclient-blob", bytes.NewReader(data), desc, content.WithLabels(labels)); err != nil {
		fail("WriteBlob", err)
	}
	// the same blob again: already exists, which WriteBlob takes as success
	if err := content.WriteBlob(ctx, cs, "goclient-blob-again", bytes.NewReader(data), desc); err != nil {
		fail("WriteBlob again", err)
	}
	info, err := cs.Info(ctx, desc.Digest)
	if err != nil || info.Size != desc.Size || info.Labels["goclient"] != "yes" {
		fail("Info", fmt.Errorf("%+v %v", info, err))
	}
	info.Labels = map[string]string{"goclient": "updated", "other": "x"}
	updated, err := cs.Update(ctx, info, "labels.goclient")
	if err != nil || updated.Labels["goclient"] != "updated" || updated.Labels["other"] != "" {
		fail("Update labels.goclient", fmt.Errorf("%+v %v", updated.Labels, err))
	}
	found := 0
	if err := cs.Walk(ctx, func(i content.Info) error {
		if i.Digest == desc.Digest {
			found++
		}
		return nil
	}, `labels.goclient==updated`); err != nil || found != 1 {
		fail("Walk with a filter", fmt.Errorf("found %d, %v", found, err))
	}
	ra, err := cs.ReaderAt(ctx, desc)
	if err != nil {
		fail("ReaderAt", err)
	}
	part := make([]byte, 7)
	if _, err := ra.ReadAt(part, 5); err != nil || string(part) != "content" || ra.Size() != desc.Size {
		fail("ReadAt", fmt.Errorf("%q size %d %v", part, ra.Size(), err))
	}
	ra.Close()
	// an ingest left open, seen in ListStatuses, then aborted
	w, err := content.OpenWriter(ctx, cs, content.WithRef("goclient-partial"))
	if err != nil {
		fail("OpenWriter", err)
	}
	if _, err := w.Write([]byte("partial")); err != nil {
		fail("Write", err)
	}
	statuses, err := cs.ListStatuses(ctx)
	if err != nil {
		fail("ListStatuses", err)
	}
	seen := false
	for _, s := range statuses {
		if s.Ref == "goclient-partial" && s.Offset == 7 {
			seen = true
		}
	}
	if !seen {
		fail("ListStatuses", fmt.Errorf("no goclient-partial at offset 7 in %+v", statuses))
	}
	w.Close()
	if err := cs.Abort(ctx, "goclient-partial"); err != nil {
		fail("Abort", err)
	}
	if _, err := cs.Status(ctx, "goclient-partial"); !errdefs.IsNotFound(err) {
		fail("Status after Abort", fmt.Errorf("want not found, got %v", err))
	}
	// a wrong digest at commit is refused, and nothing is stored
	bad := ocispec.Descriptor{Digest: digest.FromString("something else"), Size: int64(len(data))}
	if err := content.WriteBlob(ctx, cs, "goclient-bad", bytes.NewReader(data), bad); err == nil {
		fail("WriteBlob with a wrong digest", fmt.Errorf("accepted"))
	}
	cs.Abort(ctx, "goclient-bad")
	if err := cs.Delete(ctx, desc.Digest); err != nil {
		fail("Delete", err)
	}
	_, err = cs.Info(ctx, desc.Digest)
	expect("Info after Delete", err, errdefs.IsNotFound, "not found")
}

// flowLeases: a lease holds content the GC would take; its resources; deleting it
// synchronously lets the GC take the content.
func flowLeases(ctx context.Context, client *containerd.Client, address, rootfs string) {
	manager := client.LeasesService()
	lease, err := manager.Create(ctx, leases.WithRandomID(), leases.WithExpiration(time.Hour),
		leases.WithLabels(map[string]string{"goclient": "lease"}))
	if err != nil {
		fail("Create", err)
	}
	listed, err := manager.List(ctx, `labels.goclient==lease`)
	if err != nil || len(listed) != 1 || listed[0].ID != lease.ID {
		fail("List with a filter", fmt.Errorf("%+v %v", listed, err))
	}
	leased := leases.WithLease(ctx, lease.ID)
	data := []byte("held by a lease\n")
	desc := ocispec.Descriptor{Digest: digest.FromBytes(data), Size: int64(len(data))}
	if err := content.WriteBlob(leased, client.ContentStore(), "goclient-leased", bytes.NewReader(data), desc); err != nil {
		fail("WriteBlob under the lease", err)
	}
	resources, err := manager.ListResources(ctx, lease)
	if err != nil {
		fail("ListResources", err)
	}
	held := false
	for _, r := range resources {
		if r.Type == "content" && r.ID == desc.Digest.String() {
			held = true
		}
	}
	if !held {
		fail("ListResources", fmt.Errorf("the blob is not among %+v", resources))
	}
	extra := leases.Resource{ID: "goclient-snap", Type: "snapshots/" + snapshotter}
	if err := manager.AddResource(ctx, lease, extra); err != nil {
		fail("AddResource", err)
	}
	if err := manager.DeleteResource(ctx, lease, extra); err != nil {
		fail("DeleteResource", err)
	}
	if _, err := client.ContentStore().Info(ctx, desc.Digest); err != nil {
		fail("Info of leased content", err)
	}
	if err := manager.Delete(ctx, lease, leases.SynchronousDelete); err != nil {
		fail("Delete (synchronous)", err)
	}
	_, err = client.ContentStore().Info(ctx, desc.Digest)
	expect("Info after the lease went", err, errdefs.IsNotFound, "not found (collected)")
	err = manager.Delete(ctx, lease)
	expect("Delete again", err, errdefs.IsNotFound, "not found")
}

// flowImages: image records: create, conflicts, get, list filtered, update by field path,
// delete; a target that is not in the content store is still a record.
func flowImages(ctx context.Context, client *containerd.Client, address, rootfs string) {
	is := client.ImageService()
	data := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)
	target := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(data), Size: int64(len(data))}
	if err := content.WriteBlob(ctx, client.ContentStore(), "goclient-index", bytes.NewReader(data), target); err != nil {
		fail("WriteBlob", err)
	}
	name := "goclient.test/library/empty:v1"
	created, err := is.Create(ctx, images.Image{Name: name, Target: target, Labels: map[string]string{"goclient": "img"}})
	if err != nil {
		fail("Create", err)
	}
	if created.CreatedAt.IsZero() || created.UpdatedAt.IsZero() {
		fail("Create", fmt.Errorf("no times: %+v", created))
	}
	_, err = is.Create(ctx, images.Image{Name: name, Target: target})
	expect("Create again", err, errdefs.IsAlreadyExists, "already exists")
	got, err := is.Get(ctx, name)
	if err != nil || got.Target.Digest != target.Digest || got.Labels["goclient"] != "img" {
		fail("Get", fmt.Errorf("%+v %v", got, err))
	}
	list, err := is.List(ctx, `name~="goclient.test"`, `labels.goclient==img`)
	if err != nil || len(list) != 1 {
		fail("List with filters", fmt.Errorf("%+v %v", list, err))
	}
	got.Labels = map[string]string{"goclient": "changed", "new": "1"}
	updated, err := is.Update(ctx, got, "labels.new")
	if err != nil || updated.Labels["new"] != "1" || updated.Labels["goclient"] != "img" {
		fail("Update labels.new", fmt.Errorf("%+v %v", updated.Labels, err))
	}
	_, err = is.Update(ctx, images.Image{Name: "goclient.test/none:v1", Target: target})
	expect("Update of a missing image", err, errdefs.IsNotFound, "not found")
	_, err = is.Get(ctx, "goclient.test/none:v1")
	expect("Get of a missing image", err, errdefs.IsNotFound, "not found")
	if err := is.Delete(ctx, name, images.SynchronousDelete()); err != nil {
		fail("Delete", err)
	}
	err = is.Delete(ctx, name)
	expect("Delete again", err, errdefs.IsNotFound, "not found")
	// the index was only held by the image: a synchronous delete collected it
	_, err = client.ContentStore().Info(ctx, target.Digest)
	expect("Info of the collected index", err, errdefs.IsNotFound, "not found")
}

// layerTar: a gzip-compressed tar holding one file, and its digest uncompressed.
func layerTar(name, text string) ([]byte, digest.Digest) {
	var raw bytes.Buffer
	writeTar(&raw, name, text)
	var gz bytes.Buffer
	zw, err := compression.CompressStream(&gz, compression.Gzip)
	if err != nil {
		fail("CompressStream", err)
	}
	zw.Write(raw.Bytes())
	zw.Close()
	return gz.Bytes(), digest.FromBytes(raw.Bytes())
}

// flowSnapshotsDiff: a layer applied onto a prepared snapshot (the Diff service on the
// snapshot's mounts), committed; a child written through its mounts, and the diff
// between them computed by the Diff service; usage, walk, labels, removal order.
func flowSnapshotsDiff(ctx context.Context, client *containerd.Client, address, rootfs string) {
	sn := client.SnapshotService(snapshotter)
	cs := client.ContentStore()
	unleased := ctx
	ctx, done, err := client.WithLease(ctx)
	if err != nil {
		fail("WithLease", err)
	}
	cleanups = append(cleanups, func() { done(unleased) })
	blob, diffID := layerTar("etc/layer-file", "from the layer\n")
	layer := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
	if err := content.WriteBlob(ctx, cs, "goclient-layer", bytes.NewReader(blob), layer); err != nil {
		fail("WriteBlob", err)
	}
	mounts, err := sn.Prepare(ctx, "goclient-base-active", "")
	if err != nil {
		fail("Prepare", err)
	}
	applied, err := client.DiffService().Apply(ctx, layer, mounts)
	if err != nil {
		fail("Apply", err)
	}
	if applied.Digest != diffID {
		fail("Apply", fmt.Errorf("applied %s, want the uncompressed digest %s", applied.Digest, diffID))
	}
	if err := sn.Commit(ctx, "goclient-base", "goclient-base-active", snapshots.WithLabels(map[string]string{"goclient": "base"})); err != nil {
		fail("Commit", err)
	}
	info, err := sn.Stat(ctx, "goclient-base")
	if err != nil || info.Kind != snapshots.KindCommitted || info.Labels["goclient"] != "base" {
		fail("Stat", fmt.Errorf("%+v %v", info, err))
	}
	child, err := sn.Prepare(ctx, "goclient-child", "goclient-base")
	if err != nil {
		fail("Prepare child", err)
	}
	dir, err := os.MkdirTemp("", "bt-goclient-")
	if err != nil {
		fail("MkdirTemp", err)
	}
	cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	if err := mount.All(child, dir); err != nil {
		fail("mount the child", err)
	}
	got, readErr := os.ReadFile(dir + "/etc/layer-file")
	writeErr := os.WriteFile(dir+"/etc/child-file", []byte("written in the child\n"), 0o644)
	if err := mount.UnmountAll(dir, 0); err != nil {
		fail("unmount", err)
	}
	if readErr != nil || string(got) != "from the layer\n" || writeErr != nil {
		fail("the child's view", fmt.Errorf("%q %v %v", got, readErr, writeErr))
	}
	base, err := sn.View(ctx, "goclient-base-view", "goclient-base")
	if err != nil {
		fail("View", err)
	}
	upper, err := sn.Mounts(ctx, "goclient-child")
	if err != nil {
		fail("Mounts", err)
	}
	computed, err := client.DiffService().Compare(ctx, base, upper, diff.WithMediaType(ocispec.MediaTypeImageLayerGzip))
	if err != nil {
		fail("Compare", err)
	}
	if _, err := cs.Info(ctx, computed.Digest); err != nil || computed.Size <= 0 {
		fail("the computed diff in the content store", fmt.Errorf("%+v %v", computed, err))
	}
	ra, err := cs.ReaderAt(ctx, computed)
	if err != nil {
		fail("ReaderAt of the diff", err)
	}
	names := tarNames(content.NewReader(ra), computed.MediaType)
	ra.Close()
	if !strings.Contains(names, "etc/child-file") || strings.Contains(names, "etc/layer-file") {
		fail("the diff's entries", fmt.Errorf("%s", names))
	}
	usage, err := sn.Usage(ctx, "goclient-base")
	if err != nil || usage.Size <= 0 {
		fail("Usage", fmt.Errorf("%+v %v", usage, err))
	}
	walked := map[string]bool{}
	if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		walked[i.Name] = true
		return nil
	}, `labels.goclient==base`); err != nil || !walked["goclient-base"] || len(walked) != 1 {
		fail("Walk with a filter", fmt.Errorf("%v %v", walked, err))
	}
	info.Labels = map[string]string{"goclient": "base", "more": "yes"}
	if _, err := sn.Update(ctx, info, "labels.more"); err != nil {
		fail("Update", err)
	}
	err = sn.Remove(ctx, "goclient-base")
	expect("Remove a parent", err, errdefs.IsFailedPrecondition, "failed precondition")
	for _, key := range []string{"goclient-child", "goclient-base-view", "goclient-base"} {
		if err := sn.Remove(ctx, key); err != nil {
			fail("Remove "+key, err)
		}
	}
	_, err = sn.Stat(ctx, "goclient-base")
	expect("Stat after Remove", err, errdefs.IsNotFound, "not found")
}

// flowIntrospection: the server's plugins and identity, as clients check capabilities.
func flowIntrospection(ctx context.Context, client *containerd.Client, address, rootfs string) {
	plugins, err := client.IntrospectionService().Plugins(ctx, nil)
	if err != nil {
		fail("Plugins", err)
	}
	kinds := map[string]bool{}
	for _, p := range plugins.Plugins {
		kinds[p.Type+"/"+p.ID] = true
	}
	for _, want := range []string{"io.containerd.snapshotter.v1/" + snapshotter, "io.containerd.runtime.v2/task"} {
		if !kinds[want] {
			fail("Plugins", fmt.Errorf("no %s among %v", want, kinds))
		}
	}
	filtered, err := client.IntrospectionService().Plugins(ctx, []string{`type==io.containerd.snapshotter.v1`})
	if err != nil || len(filtered.Plugins) == 0 {
		fail("Plugins with a filter", fmt.Errorf("%v %v", filtered, err))
	}
	for _, p := range filtered.Plugins {
		if p.Type != "io.containerd.snapshotter.v1" {
			fail("Plugins with a filter", fmt.Errorf("got type %s", p.Type))
		}
	}
	server, err := client.Server(ctx)
	if err != nil || server.UUID == "" {
		fail("Server", fmt.Errorf("%+v %v", server, err))
	}
	version, err := client.Version(ctx)
	if err != nil || version.Version == "" {
		fail("Version", fmt.Errorf("%+v %v", version, err))
	}
	serving, err := client.IsServing(ctx)
	if err != nil || !serving {
		fail("IsServing", fmt.Errorf("%v %v", serving, err))
	}
}

// flowNamespaces: create with labels, list, refuse to delete one that holds something,
// delete an empty one.
func flowNamespaces(ctx context.Context, client *containerd.Client, address, rootfs string) {
	ns := client.NamespaceService()
	name := fmt.Sprintf("goclient-ns-%d", time.Now().UnixNano())
	if err := ns.Create(ctx, name, map[string]string{"goclient": "ns"}); err != nil {
		fail("Create", err)
	}
	err := ns.Create(ctx, name, nil)
	expect("Create again", err, errdefs.IsAlreadyExists, "already exists")
	names, err := ns.List(ctx)
	if err != nil || !contains(names, name) {
		fail("List", fmt.Errorf("%v %v", names, err))
	}
	inner := namespaces.WithNamespace(ctx, name)
	container, err := client.NewContainer(inner, "go-in-ns",
		containerd.WithNewSpec(oci.WithRootFSPath(rootfs), oci.WithProcessArgs("true")))
	if err != nil {
		fail("NewContainer", err)
	}
	err = ns.Delete(ctx, name)
	expect("Delete of a namespace with a container", err, errdefs.IsFailedPrecondition, "failed precondition")
	if err := container.Delete(inner); err != nil {
		fail("container Delete", err)
	}
	if err := ns.Delete(ctx, name); err != nil {
		fail("Delete", err)
	}
	names, err = ns.List(ctx)
	if err != nil || contains(names, name) {
		fail("List after Delete", fmt.Errorf("%v %v", names, err))
	}
}

// flowExportImport: an image exported to an OCI archive by the client and imported back
// under another name.
func flowExportImport(ctx context.Context, client *containerd.Client, address, rootfs string) {
	ref := os.Getenv("GOCLIENT_REF")
	resolver := docker.NewResolver(docker.ResolverOptions{PlainHTTP: true})
	image, err := client.Fetch(ctx, ref, containerd.WithResolver(resolver))
	if err != nil {
		fail("Fetch", err)
	}
	var archived bytes.Buffer
	if err := client.Export(ctx, &archived, archive.WithImage(client.ImageService(), image.Name),
		archive.WithPlatform(platforms.Default())); err != nil {
		fail("Export", err)
	}
	if err := client.ImageService().Delete(ctx, image.Name, images.SynchronousDelete()); err != nil {
		fail("image Delete", err)
	}
	imported, err := client.Import(ctx, bytes.NewReader(archived.Bytes()),
		containerd.WithImageRefTranslator(func(string) string { return "goclient.test/imported:v1" }))
	if err != nil || len(imported) != 1 || imported[0].Target.Digest != image.Target.Digest {
		fail("Import", fmt.Errorf("%+v %v", imported, err))
	}
	img := containerd.NewImage(client, imported[0])
	if err := img.Unpack(ctx, snapshotter); err != nil {
		fail("Unpack", err)
	}
	if err := client.ImageService().Delete(ctx, imported[0].Name, images.SynchronousDelete()); err != nil {
		fail("imported image Delete", err)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func writeTar(w io.Writer, name, text string) {
	tw := tar.NewWriter(w)
	dir := name[:strings.LastIndex(name, "/")+1]
	if dir != "" {
		tw.WriteHeader(&tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)})
	}
	tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(text)), ModTime: time.Unix(0, 0)})
	tw.Write([]byte(text))
	tw.Close()
}

// tarNames: the entries of a layer (gzip-compressed when its media type says so).
func tarNames(r io.Reader, mediaType string) string {
	if strings.HasSuffix(mediaType, "gzip") {
		zr, err := gzip.NewReader(r)
		if err != nil {
			fail("gzip", err)
		}
		r = zr
	}
	tr := tar.NewReader(r)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("tar", err)
		}
		names = append(names, strings.TrimPrefix(h.Name, "./"))
	}
	return strings.Join(names, " ")
}
