// A probe built from containerd's own Go client (Debian's golang-github-containerd-
// containerd-dev, the library dockerd, nerdctl and BuildKit link): each subcommand runs one
// client flow against a containerd-compatible socket and prints "ok" or the error, so the
// tests can run the same flow against berth (and containerd) unmodified.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/containerd/containerd"
	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	versionapi "github.com/containerd/containerd/api/services/version/v1"
	"github.com/containerd/containerd/cio"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/oci"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl"
	"github.com/gogo/protobuf/types"
)

// cleanups run, last first, when a flow ends: after it returns, or from fail(), which
// exits without running defers. A flow registers what it made (see flows_runtime.go).
var cleanups []func()

func runCleanups() {
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	cleanups = nil
}

func fail(step string, err error) {
	runCleanups()
	fmt.Printf("%s: %v\n", step, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 5 {
		fmt.Println("usage: goclient ADDRESS NAMESPACE ROOTFS FLOW")
		os.Exit(2)
	}
	if os.Args[1] == "write-diff" { // goclient write-diff LOWER UPPER OUT: no daemon
		writeDiff(os.Args[2], os.Args[3], os.Args[4])
		return
	}
	address, ns, rootfs, flow := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	client, err := containerd.New(address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		fail("connect", err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 60*time.Second)
	defer cancel()
	run, ok := flows[flow]
	if !ok {
		fmt.Println("unknown flow", flow)
		os.Exit(2)
	}
	run(ctx, client, address, rootfs)
	runCleanups()
	fmt.Println("ok")
}

// flows: each one client flow, run by name; a flow ends by returning (ok) or fail().
// More live in flows_*.go, which add themselves here from init(). What a flow needs beyond
// its arguments (a registry's address, say) comes in the environment (GOCLIENT_*).
var flows = map[string]func(ctx context.Context, client *containerd.Client, address, rootfs string){
	"namespace-labels":    flowNamespaceLabels,
	"created-task-delete": flowCreatedTaskDelete,
	"extensions":          flowExtensions,
	"run":                 flowRun,
	"ttrpc":               flowTtrpc,
}

func flowNamespaceLabels(ctx context.Context, client *containerd.Client, address, rootfs string) {
	ns, _ := namespaces.Namespace(ctx)
	// what the client does to set up a fresh namespace's defaults
	if err := client.NamespaceService().SetLabel(ctx, ns, "containerd.io/defaults/snapshotter", "overlayfs"); err != nil {
		fail("SetLabel", err)
	}
	labels, err := client.NamespaceService().Labels(ctx, ns)
	if err != nil {
		fail("Labels", err)
	}
	if labels["containerd.io/defaults/snapshotter"] != "overlayfs" {
		fail("Labels", fmt.Errorf("got %v", labels))
	}
}

func flowCreatedTaskDelete(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container, err := client.NewContainer(ctx, "go-created",
		containerd.WithNewSpec(oci.WithRootFSPath(rootfs), oci.WithDefaultPathEnv, oci.WithProcessArgs("sleep", "100")))
	if err != nil {
		fail("NewContainer", err)
	}
	cleanups = append(cleanups, func() { container.Delete(ctx) })
	task, err := container.NewTask(ctx, cio.NullIO)
	if err != nil {
		fail("NewTask", err)
	}
	// a deferred clean-up, as clients write it: kill what may be running, delete
	if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("Delete(WithProcessKill)", err)
	}
	if err := container.Delete(ctx); err != nil {
		fail("container Delete", err)
	}
}

func flowExtensions(ctx context.Context, client *containerd.Client, address, rootfs string) {
	value, err := typeurl.MarshalAny(&types.StringValue{Value: "berth"})
	if err != nil {
		fail("MarshalAny", err)
	}
	container, err := client.NewContainer(ctx, "go-ext",
		containerd.WithNewSpec(oci.WithRootFSPath(rootfs), oci.WithDefaultPathEnv, oci.WithProcessArgs("true")),
		containerd.WithContainerExtension("probe", value))
	if err != nil {
		fail("NewContainer", err)
	}
	cleanups = append(cleanups, func() { container.Delete(ctx) })
	exts, err := container.Extensions(ctx)
	if err != nil {
		fail("Extensions", err)
	}
	got, ok := exts["probe"]
	if !ok || got.TypeUrl != value.TypeUrl || string(got.Value) != string(value.Value) {
		fail("Extensions", fmt.Errorf("got %v", exts))
	}
}

func flowRun(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container, err := client.NewContainer(ctx, "go-run",
		containerd.WithNewSpec(oci.WithRootFSPath(rootfs), oci.WithDefaultPathEnv, oci.WithProcessArgs("sh", "-c", "exit 7")))
	if err != nil {
		fail("NewContainer", err)
	}
	cleanups = append(cleanups, func() { container.Delete(ctx) })
	task, err := container.NewTask(ctx, cio.NullIO)
	if err != nil {
		fail("NewTask", err)
	}
	status, err := task.Wait(ctx)
	if err != nil {
		fail("Wait", err)
	}
	if err := task.Start(ctx); err != nil {
		fail("Start", err)
	}
	exit := <-status
	if exit.ExitCode() != 7 {
		fail("exit", fmt.Errorf("status %d", exit.ExitCode()))
	}
	if err := task.Kill(ctx, syscall.SIGKILL); err == nil {
		fmt.Println("note: kill of an exited task succeeded")
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}

func flowTtrpc(ctx context.Context, client *containerd.Client, address, rootfs string) {
	// containerd's ttrpc socket, through containerd's ttrpc client library
	conn, err := net.Dial("unix", address+".ttrpc")
	if err != nil {
		fail("dial", err)
	}
	tc := ttrpc.NewClient(conn)
	defer tc.Close()
	var version versionapi.VersionResponse
	if err := tc.Call(ctx, "containerd.services.version.v1.Version", "Version", &types.Empty{}, &version); err != nil {
		fail("Version", err)
	}
	if version.Version == "" {
		fail("Version", fmt.Errorf("empty version"))
	}
	var listed tasksapi.ListTasksResponse
	if err := tc.Call(ctx, "containerd.services.tasks.v1.Tasks", "List", &tasksapi.ListTasksRequest{}, &listed); err != nil {
		fail("Tasks.List", err)
	}
	var got tasksapi.GetResponse
	err = tc.Call(ctx, "containerd.services.tasks.v1.Tasks", "Get", &tasksapi.GetRequest{ContainerID: "nobody"}, &got)
	if err == nil {
		fail("Tasks.Get", fmt.Errorf("no error for a task that does not exist"))
	}
	fmt.Printf("not found answered: %v\n", err)
}
