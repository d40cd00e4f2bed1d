// Task and runtime flows: the client's process I/O (FIFOs, terminals, log URIs), execs,
// signals, pause/resume, updates, metrics, events, attaching to a running task, and the
// spec options clients build containers with.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	cgroupsv1 "github.com/containerd/cgroups/stats/v1"
	cgroupsv2 "github.com/containerd/cgroups/v2/stats"
	"github.com/containerd/containerd"
	eventstypes "github.com/containerd/containerd/api/events"
	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	"github.com/containerd/containerd/cio"
	"github.com/containerd/containerd/containers"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/events"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/oci"
	"github.com/containerd/containerd/runtime/v2/runc/options"
	"github.com/containerd/typeurl"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/status"
)

func init() {
	flows["io"] = flowIO
	flows["io-close-stdin"] = flowIOCloseStdin
	flows["exec"] = flowExec
	flows["exec-missing-binary"] = flowExecMissingBinary
	flows["tty"] = flowTTY
	flows["tty-exec"] = flowTTYExec
	flows["pids-metrics"] = flowPidsMetrics
	flows["pause-resume"] = flowPauseResume
	flows["update-resources"] = flowUpdateResources
	flows["container-records"] = flowContainerRecords
	flows["events"] = flowEvents
	flows["events-publish"] = flowEventsPublish
	flows["kill-signals"] = flowKillSignals
	flows["reattach"] = flowReattach
	flows["reattach-output"] = flowReattachOutput
	flows["checkpoint"] = flowCheckpoint
	flows["spec-opts"] = flowSpecOpts
	flows["log-file"] = flowLogFile
	flows["log-binary"] = flowLogBinary
	flows["rootfs-mounts"] = flowRootfsMounts
	flows["task-list"] = flowTaskList
	flows["events-exec"] = flowEventsExec
	flows["events-oom"] = flowEventsOOM
	flows["runtime-options"] = flowRuntimeOptions
}

// -- helpers ----------------------------------------------------------------------------

// rtCleanCtx is a fresh context in ctx's namespace: the flow's may have expired.
func rtCleanCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ns, _ := namespaces.Namespace(ctx)
	return context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 15*time.Second)
}

func rtID(name string) string {
	return fmt.Sprintf("rt-%s-%d", name, os.Getpid())
}

// newContainer: a container on the rootfs, removed (with any task) when the flow ends.
func rtContainer(ctx context.Context, client *containerd.Client, id, rootfs string, opts ...oci.SpecOpts) containerd.Container {
	all := append([]oci.SpecOpts{oci.WithRootFSPath(rootfs), oci.WithDefaultPathEnv}, opts...)
	container, err := client.NewContainer(ctx, id, containerd.WithNewSpec(all...))
	if err != nil {
		fail("NewContainer "+id, err)
	}
	cleanups = append(cleanups, func() {
		cctx, cancel := rtCleanCtx(ctx)
		defer cancel()
		if task, err := container.Task(cctx, nil); err == nil {
			if _, err := task.Delete(cctx, containerd.WithProcessKill); err != nil {
				fmt.Printf("cleanup: task Delete %s: %v\n", id, err)
			}
		}
		if err := container.Delete(cctx); err != nil && !errdefs.IsNotFound(err) {
			fmt.Printf("cleanup: container Delete %s: %v\n", id, err)
		}
	})
	return container
}

// rtBuffer: a writer the client's copy goroutines write while the flow reads.
type rtBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *rtBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *rtBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// waitFor polls until cond holds, or fails the flow after timeout.
func rtWaitFor(step string, timeout time.Duration, cond func() bool, detail func() string) {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			fail(step, fmt.Errorf("timed out after %s: %s", timeout, detail()))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func rtExit(step string, ch <-chan containerd.ExitStatus, timeout time.Duration) containerd.ExitStatus {
	select {
	case s := <-ch:
		if s.Error() != nil {
			fail(step, s.Error())
		}
		return s
	case <-time.After(timeout):
		fail(step, fmt.Errorf("no exit within %s", timeout))
	}
	panic("unreachable")
}

// startTask: NewTask, Wait, Start; the exit channel.
// newCreator is cio.NewCreator with the FIFOs in the test's own directory
// (GOCLIENT_FIFO_DIR), never in containerd's default /run/containerd/fifo.
func newCreator(opts ...cio.Opt) cio.Creator {
	dir := os.Getenv("GOCLIENT_FIFO_DIR")
	if dir == "" {
		fail("fifo dir", errors.New("GOCLIENT_FIFO_DIR is not set"))
	}
	return cio.NewCreator(append([]cio.Opt{cio.WithFIFODir(dir)}, opts...)...)
}

func rtStart(ctx context.Context, container containerd.Container, creator cio.Creator, opts ...containerd.NewTaskOpts) (containerd.Task, <-chan containerd.ExitStatus) {
	task, err := container.NewTask(ctx, creator, opts...)
	if err != nil {
		fail("NewTask", err)
	}
	cleanups = append(cleanups, rtCloseIO(task))
	ch, err := task.Wait(ctx)
	if err != nil {
		fail("Wait", err)
	}
	if err := task.Start(ctx); err != nil {
		fail("Start", err)
	}
	return task, ch
}

// rtCloseIO: the client's ends of a process's FIFOs closed and their directory removed,
// when a flow fails before Delete does it.
func rtCloseIO(p containerd.Process) func() {
	return func() {
		if i := p.IO(); i != nil {
			i.Cancel()
			i.Close()
		}
	}
}

// processSpec: the container's process with other args (as dockerd and nerdctl exec).
func rtProcessSpec(ctx context.Context, container containerd.Container, args ...string) *specs.Process {
	spec, err := container.Spec(ctx)
	if err != nil {
		fail("Spec", err)
	}
	p := *spec.Process
	p.Args = args
	p.Terminal = false
	return &p
}

func rtCode(err error) string {
	var cause error = err
	for cause != nil {
		if s, ok := status.FromError(cause); ok {
			return s.Code().String()
		}
		cause = errors.Unwrap(cause)
	}
	switch {
	case errdefs.IsNotImplemented(err):
		return "errdefs.NotImplemented"
	case errdefs.IsNotFound(err):
		return "errdefs.NotFound"
	case errdefs.IsFailedPrecondition(err):
		return "errdefs.FailedPrecondition"
	case errdefs.IsAlreadyExists(err):
		return "errdefs.AlreadyExists"
	case errdefs.IsInvalidArgument(err):
		return "errdefs.InvalidArgument"
	case errdefs.IsUnavailable(err):
		return "errdefs.Unavailable"
	}
	return "unknown"
}

// -- flows ------------------------------------------------------------------------------

// io: FIFO I/O as ctr sets it up; stdin (a reader whose end ctr turns into
// CloseIO(WithStdinCloser), as the runtime holds the stdin FIFO open itself) comes back on
// stdout, stderr apart; the exit status again from a Wait after the exit.
func flowIO(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("io"), rootfs,
		oci.WithProcessArgs("sh", "-c", "cat; echo err >&2; exit 4"))
	var stdout, stderr rtBuffer
	input := "hello\nworld\n" + strings.Repeat("x", 100000) + "\n"
	stdin := &rtStdinCloser{r: strings.NewReader(input), ready: make(chan struct{})}
	task, ch := rtStart(ctx, container,
		newCreator(cio.WithStreams(stdin, &stdout, &stderr)))
	stdin.close = func() error { return task.CloseIO(ctx, containerd.WithStdinCloser) }
	close(stdin.ready)
	exit := rtExit("exit", ch, 20*time.Second)
	if stdin.err != nil {
		fail("CloseIO", stdin.err)
	}
	if exit.ExitCode() != 4 {
		fail("exit", fmt.Errorf("status %d", exit.ExitCode()))
	}
	done := make(chan struct{})
	go func() { task.IO().Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		fail("IO().Wait", fmt.Errorf("the output FIFOs never closed (stdout %d bytes, stderr %q)", len(stdout.String()), stderr.String()))
	}
	if err := task.IO().Close(); err != nil {
		fail("IO().Close", err)
	}
	if got := stdout.String(); got != input {
		fail("stdout", fmt.Errorf("%d bytes, want %d: %.60q", len(got), len(input), got))
	}
	if got := stderr.String(); got != "err\n" {
		fail("stderr", fmt.Errorf("%q", got))
	}
	st, err := task.Status(ctx)
	if err != nil {
		fail("Status", err)
	}
	if st.Status != containerd.Stopped || st.ExitStatus != 4 {
		fail("Status", fmt.Errorf("%+v", st))
	}
	again, err := task.Wait(ctx)
	if err != nil {
		fail("Wait after exit", err)
	}
	if s := rtExit("Wait after exit", again, 5*time.Second); s.ExitCode() != 4 {
		fail("Wait after exit", fmt.Errorf("status %d", s.ExitCode()))
	}
	deleted, err := task.Delete(ctx)
	if err != nil {
		fail("Delete", err)
	}
	if deleted.ExitCode() != 4 || deleted.ExitTime().IsZero() {
		fail("Delete", fmt.Errorf("exit status %d at %v", deleted.ExitCode(), deleted.ExitTime()))
	}
}

// rtStdinCloser: ctr's stdinCloser, a stdin that calls CloseIO at its end.
type rtStdinCloser struct {
	r     io.Reader
	ready chan struct{}
	close func() error
	err   error
}

func (s *rtStdinCloser) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err == io.EOF {
		<-s.ready
		s.err = s.close()
	}
	return n, err
}

// io-close-stdin: stdin a pipe the client writes, then closes; CloseIO(WithStdinCloser)
// (the runtime's own hold on the FIFO) ends the input.
func flowIOCloseStdin(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("closeio"), rootfs,
		oci.WithProcessArgs("sh", "-c", "cat; echo eof"))
	r, w := io.Pipe()
	defer w.Close()
	var stdout rtBuffer
	task, ch := rtStart(ctx, container, newCreator(cio.WithStreams(r, &stdout, &stdout)))
	if _, err := w.Write([]byte("abc\n")); err != nil {
		fail("write stdin", err)
	}
	rtWaitFor("echo of stdin", 10*time.Second, func() bool { return stdout.String() == "abc\n" }, stdout.String)
	w.Close()
	if err := task.CloseIO(ctx, containerd.WithStdinCloser); err != nil {
		fail("CloseIO", err)
	}
	exit := rtExit("exit after CloseIO", ch, 10*time.Second)
	if exit.ExitCode() != 0 {
		fail("exit", fmt.Errorf("status %d", exit.ExitCode()))
	}
	task.IO().Wait()
	if got := stdout.String(); got != "abc\neof\n" {
		fail("stdout", fmt.Errorf("%q", got))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}

// exec: an exec's output and exit status, its status through its life, its ID used
// again once deleted, a second exec with a live one's ID refused.
func flowExec(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("exec"), rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	var out rtBuffer
	process, err := task.Exec(ctx, "e1", rtProcessSpec(ctx, container, "sh", "-c", "echo hi; exit 3"),
		newCreator(cio.WithStreams(nil, &out, &out)))
	if err != nil {
		fail("Exec", err)
	}
	cleanups = append(cleanups, rtCloseIO(process))
	if st, err := process.Status(ctx); err != nil || st.Status != containerd.Created {
		fail("exec Status before Start", fmt.Errorf("%+v %v", st, err))
	}
	ch, err := process.Wait(ctx)
	if err != nil {
		fail("exec Wait", err)
	}
	if err := process.Start(ctx); err != nil {
		fail("exec Start", err)
	}
	if process.Pid() == 0 {
		fail("exec Pid", fmt.Errorf("0 after Start"))
	}
	if s := rtExit("exec exit", ch, 10*time.Second); s.ExitCode() != 3 {
		fail("exec exit", fmt.Errorf("status %d", s.ExitCode()))
	}
	process.IO().Wait()
	if out.String() != "hi\n" {
		fail("exec output", fmt.Errorf("%q", out.String()))
	}
	if st, err := process.Status(ctx); err != nil || st.Status != containerd.Stopped || st.ExitStatus != 3 {
		fail("exec Status after exit", fmt.Errorf("%+v %v", st, err))
	}
	deleted, err := process.Delete(ctx)
	if err != nil {
		fail("exec Delete", err)
	}
	if deleted.ExitCode() != 3 {
		fail("exec Delete", fmt.Errorf("status %d", deleted.ExitCode()))
	}
	if _, err := task.LoadProcess(ctx, "e1", nil); err == nil || !errdefs.IsNotFound(errors.Unwrap(err)) && !errdefs.IsNotFound(err) {
		fail("LoadProcess of a deleted exec", fmt.Errorf("want NotFound, got %v", err))
	}

	// the same ID again
	var out2 rtBuffer
	again, err := task.Exec(ctx, "e1", rtProcessSpec(ctx, container, "echo", "again"),
		newCreator(cio.WithStreams(nil, &out2, &out2)))
	if err != nil {
		fail("Exec (ID used again)", err)
	}
	cleanups = append(cleanups, rtCloseIO(again))
	ch, err = again.Wait(ctx)
	if err != nil {
		fail("Wait (ID used again)", err)
	}
	if err := again.Start(ctx); err != nil {
		fail("Start (ID used again)", err)
	}
	if s := rtExit("exit (ID used again)", ch, 10*time.Second); s.ExitCode() != 0 {
		fail("exit (ID used again)", fmt.Errorf("status %d", s.ExitCode()))
	}
	again.IO().Wait()
	if out2.String() != "again\n" {
		fail("output (ID used again)", fmt.Errorf("%q", out2.String()))
	}
	if _, err := again.Delete(ctx); err != nil {
		fail("Delete (ID used again)", err)
	}

	// a live exec's ID
	live, err := task.Exec(ctx, "e2", rtProcessSpec(ctx, container, "sleep", "100"), cio.NullIO)
	if err != nil {
		fail("Exec e2", err)
	}
	if err := live.Start(ctx); err != nil {
		fail("Start e2", err)
	}
	_, err = task.Exec(ctx, "e2", rtProcessSpec(ctx, container, "true"), cio.NullIO)
	if err == nil {
		fail("Exec of a live exec's ID", fmt.Errorf("accepted"))
	}
	if !errdefs.IsAlreadyExists(err) {
		fail("Exec of a live exec's ID", fmt.Errorf("want AlreadyExists, got %v (%s)", err, rtCode(err)))
	}
	// the deferred clean-up of an exec, as clients write it
	if _, err := live.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("Delete(WithProcessKill) e2", err)
	}
	if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("task Delete", err)
	}
}

// exec-missing-binary: what exec'ing a program the rootfs lacks answers, and when.
func flowExecMissingBinary(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("execmiss"), rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	process, err := task.Exec(ctx, "missing", rtProcessSpec(ctx, container, "/no/such/binary"), cio.NullIO)
	if err != nil {
		fmt.Printf("Exec error: %v (%s)\n", err, rtCode(err))
		return
	}
	err = process.Start(ctx)
	if err == nil {
		fail("exec Start", fmt.Errorf("no error for a missing binary"))
	}
	fmt.Printf("Start error: %v (%s)\n", err, rtCode(err))
	if _, err := process.Delete(ctx); err != nil {
		fmt.Printf("Delete after failed Start: %v (%s)\n", err, rtCode(err))
	}
	// the task is unharmed
	if st, err := task.Status(ctx); err != nil || st.Status != containerd.Running {
		fail("task Status", fmt.Errorf("%+v %v", st, err))
	}
	// and the ID is free again
	again, err := task.Exec(ctx, "missing", rtProcessSpec(ctx, container, "true"), cio.NullIO)
	if err != nil {
		fail("Exec (ID of the failed exec)", err)
	}
	if _, err := again.Delete(ctx); err != nil {
		fail("Delete of a created exec", err)
	}
}

// tty: a terminal task; Resize shows in `stty size`.
func flowTTY(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("tty"), rootfs, oci.WithTTY,
		oci.WithProcessArgs("sh", "-c", `while [ "$(stty size)" != "40 100" ]; do sleep 0.05; done; stty size; tty`))
	var out rtBuffer
	task, ch := rtStart(ctx, container,
		newCreator(cio.WithStreams(strings.NewReader(""), &out, nil), cio.WithTerminal))
	if err := task.Resize(ctx, 100, 40); err != nil {
		fail("Resize", err)
	}
	s := rtExit("exit after Resize", ch, 10*time.Second)
	task.IO().Wait()
	if s.ExitCode() != 0 || !strings.Contains(out.String(), "40 100\r\n") || !strings.Contains(out.String(), "/dev/") {
		fail("output", fmt.Errorf("status %d: %q", s.ExitCode(), out.String()))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}

// tty-exec: a terminal exec in a non-terminal task; process.Resize.
func flowTTYExec(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("ttyexec"), rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	spec := rtProcessSpec(ctx, container, "sh", "-c", `while [ "$(stty size)" != "30 80" ]; do sleep 0.05; done; stty size`)
	spec.Terminal = true
	var out rtBuffer
	process, err := task.Exec(ctx, "t1", spec,
		newCreator(cio.WithStreams(strings.NewReader(""), &out, nil), cio.WithTerminal))
	if err != nil {
		fail("Exec", err)
	}
	cleanups = append(cleanups, rtCloseIO(process))
	ch, err := process.Wait(ctx)
	if err != nil {
		fail("exec Wait", err)
	}
	if err := process.Start(ctx); err != nil {
		fail("exec Start", err)
	}
	if err := process.Resize(ctx, 80, 30); err != nil {
		fail("exec Resize", err)
	}
	s := rtExit("exec exit after Resize", ch, 10*time.Second)
	process.IO().Wait()
	if s.ExitCode() != 0 || !strings.Contains(out.String(), "30 80\r\n") {
		fail("exec output", fmt.Errorf("status %d: %q", s.ExitCode(), out.String()))
	}
	if _, err := process.Delete(ctx); err != nil {
		fail("exec Delete", err)
	}
}

// pids-metrics: Pids (the init's, an exec's with its ProcessDetails) and Metrics as ctr
// reads them (typeurl to cgroups' v1 or v2 Metrics).
func flowPidsMetrics(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("metrics"), rootfs,
		oci.WithProcessArgs("sh", "-c", "x=$(head -c 4000000 /dev/zero | tr '\\0' a); sleep 100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	process, err := task.Exec(ctx, "m1", rtProcessSpec(ctx, container, "sleep", "100"), cio.NullIO)
	if err != nil {
		fail("Exec", err)
	}
	if err := process.Start(ctx); err != nil {
		fail("exec Start", err)
	}
	time.Sleep(300 * time.Millisecond)
	pids, err := task.Pids(ctx)
	if err != nil {
		fail("Pids", err)
	}
	var initFound, execFound bool
	for _, p := range pids {
		if p.Pid == task.Pid() {
			initFound = true
		}
		if p.Info != nil {
			v, err := typeurl.UnmarshalAny(p.Info)
			if err != nil {
				fail("Pids info", err)
			}
			d, ok := v.(*options.ProcessDetails)
			if !ok {
				fail("Pids info", fmt.Errorf("%T", v))
			}
			if d.ExecID == "m1" && p.Pid == process.Pid() {
				execFound = true
			}
		}
	}
	if !initFound || !execFound {
		fail("Pids", fmt.Errorf("init %d exec %d: got %+v", task.Pid(), process.Pid(), pids))
	}
	metric, err := task.Metrics(ctx)
	if err != nil {
		fail("Metrics", err)
	}
	if metric.ID != container.ID() {
		fail("Metrics", fmt.Errorf("id %q", metric.ID))
	}
	data, err := typeurl.UnmarshalAny(metric.Data)
	if err != nil {
		fail("Metrics UnmarshalAny", fmt.Errorf("%s: %w", metric.Data.TypeUrl, err))
	}
	switch m := data.(type) {
	case *cgroupsv1.Metrics:
		if m.Memory == nil || m.Memory.Usage == nil || m.Memory.Usage.Usage == 0 {
			fail("v1 memory", fmt.Errorf("%+v", m.Memory))
		}
		if m.Pids == nil || m.Pids.Current < 2 {
			fail("v1 pids", fmt.Errorf("%+v", m.Pids))
		}
		if m.CPU == nil || m.CPU.Usage == nil || m.CPU.Usage.Total == 0 {
			fail("v1 cpu", fmt.Errorf("%+v", m.CPU))
		}
		fmt.Printf("cgroups v1: memory %d, pids %d, cpu %dns\n", m.Memory.Usage.Usage, m.Pids.Current, m.CPU.Usage.Total)
	case *cgroupsv2.Metrics:
		if m.Memory == nil || m.Memory.Usage == 0 {
			fail("v2 memory", fmt.Errorf("%+v", m.Memory))
		}
		if m.Pids == nil || m.Pids.Current < 2 {
			fail("v2 pids", fmt.Errorf("%+v", m.Pids))
		}
		fmt.Printf("cgroups v2: memory %d, pids %d\n", m.Memory.Usage, m.Pids.Current)
	default:
		fail("Metrics", fmt.Errorf("data of type %T (%s)", data, metric.Data.TypeUrl))
	}
	if _, err := process.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("exec Delete", err)
	}
}

// pause-resume: Status follows Pause and Resume; Delete of a running task is refused.
func flowPauseResume(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("pause"), rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	if err := task.Pause(ctx); err != nil {
		fail("Pause", err)
	}
	if st, err := task.Status(ctx); err != nil || st.Status != containerd.Paused {
		fail("Status after Pause", fmt.Errorf("%+v %v", st, err))
	}
	if err := task.Resume(ctx); err != nil {
		fail("Resume", err)
	}
	if st, err := task.Status(ctx); err != nil || st.Status != containerd.Running {
		fail("Status after Resume", fmt.Errorf("%+v %v", st, err))
	}
	if _, err := task.Delete(ctx); err == nil || !errdefs.IsFailedPrecondition(err) {
		fail("Delete of a running task", fmt.Errorf("want FailedPrecondition, got %v", err))
	}
	// a paused task is killed by the deferred clean-up too
	if err := task.Pause(ctx); err != nil {
		fail("Pause again", err)
	}
	if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("Delete(WithProcessKill) of a paused task", err)
	}
}

// update-resources: Tasks/Update of the memory limit, read back through Metrics and the
// container's own cgroup.
func flowUpdateResources(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("update"), rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	limit := int64(64 * 1024 * 1024)
	if err := task.Update(ctx, containerd.WithResources(&specs.LinuxResources{
		Memory: &specs.LinuxMemory{Limit: &limit},
	})); err != nil {
		fail("Update", err)
	}
	// what a JVM or Go runtime sizing itself reads: its own cgroup, through the spec's
	// cgroup mount at /sys/fs/cgroup
	var out rtBuffer
	process, err := task.Exec(ctx, "cat", rtProcessSpec(ctx, container, "sh", "-c",
		"cat /sys/fs/cgroup/memory/memory.limit_in_bytes || cat /sys/fs/cgroup/memory.max || { ls /sys/fs/cgroup; grep cgroup /proc/mounts; }"),
		newCreator(cio.WithStreams(nil, &out, &out)))
	if err != nil {
		fail("Exec", err)
	}
	ch, _ := process.Wait(ctx)
	if err := process.Start(ctx); err != nil {
		fail("exec Start", err)
	}
	rtExit("exec exit", ch, 10*time.Second)
	process.IO().Wait()
	process.Delete(ctx)
	if strings.TrimSpace(out.String()) != fmt.Sprint(limit) {
		fmt.Printf("note: the container's own cgroup reads %q\n", out.String())
	}
	metric, err := task.Metrics(ctx)
	if err != nil {
		fail("Metrics", err)
	}
	data, err := typeurl.UnmarshalAny(metric.Data)
	if err != nil {
		fail("Metrics UnmarshalAny", err)
	}
	var got uint64
	switch m := data.(type) {
	case *cgroupsv1.Metrics:
		got = m.Memory.Usage.Limit
	case *cgroupsv2.Metrics:
		got = m.Memory.UsageLimit
	}
	if got != uint64(limit) {
		fail("limit through Metrics", fmt.Errorf("%d, want %d", got, limit))
	}
}

// container-records: SetLabels, Labels, Update, Spec, Info as clients use them.
func flowContainerRecords(ctx context.Context, client *containerd.Client, address, rootfs string) {
	args := []string{"sh", "-c", "echo 'a b'; exit 0"}
	container := rtContainer(ctx, client, rtID("records"), rootfs, oci.WithProcessArgs(args...))
	if _, err := container.SetLabels(ctx, map[string]string{"keep": "1"}); err != nil {
		fail("SetLabels", err)
	}
	labels, err := container.SetLabels(ctx, map[string]string{"a": "1"})
	if err != nil {
		fail("SetLabels", err)
	}
	if len(labels) != 2 || labels["a"] != "1" || labels["keep"] != "1" {
		fail("SetLabels answer", fmt.Errorf("%v", labels))
	}
	labels, err = container.Labels(ctx)
	if err != nil || len(labels) != 2 || labels["a"] != "1" {
		fail("Labels", fmt.Errorf("%v %v", labels, err))
	}
	if err := container.Update(ctx, containerd.UpdateContainerOpts(
		containerd.WithContainerLabels(map[string]string{"b": "2"}))); err != nil {
		fail("Update", err)
	}
	labels, err = container.Labels(ctx)
	if err != nil || len(labels) != 1 || labels["b"] != "2" {
		fail("Labels after Update", fmt.Errorf("%v %v", labels, err))
	}
	// a spec update (as nerdctl update / dockerd's container update)
	if err := container.Update(ctx, func(ctx context.Context, client *containerd.Client, c *containers.Container) error {
		spec, err := container.Spec(ctx)
		if err != nil {
			return err
		}
		spec.Hostname = "updated"
		return containerd.WithSpec(spec)(ctx, client, c)
	}); err != nil {
		fail("Update spec", err)
	}
	spec, err := container.Spec(ctx)
	if err != nil {
		fail("Spec", err)
	}
	if strings.Join(spec.Process.Args, "\x00") != strings.Join(args, "\x00") || spec.Hostname != "updated" {
		fail("Spec", fmt.Errorf("args %q hostname %q", spec.Process.Args, spec.Hostname))
	}
	if spec.Root == nil || spec.Root.Path != rootfs {
		fail("Spec root", fmt.Errorf("%+v", spec.Root))
	}
	info, err := container.Info(ctx)
	if err != nil {
		fail("Info", err)
	}
	if info.ID != container.ID() || info.Runtime.Name == "" || info.CreatedAt.IsZero() ||
		info.UpdatedAt.Before(info.CreatedAt) || info.Spec == nil || info.Labels["b"] != "2" {
		fail("Info", fmt.Errorf("%+v", info))
	}
	fmt.Printf("runtime %q\n", info.Runtime.Name)
	if info2, err := container.Info(ctx, containerd.WithoutRefreshedMetadata); err != nil || info2.ID != info.ID {
		fail("Info(WithoutRefreshedMetadata)", fmt.Errorf("%+v %v", info2, err))
	}
	loaded, err := client.LoadContainer(ctx, container.ID())
	if err != nil {
		fail("LoadContainer", err)
	}
	if _, err := loaded.Task(ctx, nil); err == nil || !errdefs.IsNotFound(err) {
		fail("Task of a container without one", fmt.Errorf("want NotFound, got %v", err))
	}
	listed, err := client.Containers(ctx, "labels.b==2")
	if err != nil || len(listed) != 1 || listed[0].ID() != container.ID() {
		fail("Containers(labels.b==2)", fmt.Errorf("%d %v", len(listed), err))
	}
}

// events: the task events of a run, in order, each an event typeurl unmarshals.
func flowEvents(ctx context.Context, client *containerd.Client, address, rootfs string) {
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	ch, errs := client.Subscribe(sctx, `topic~="/tasks/"`)
	time.Sleep(200 * time.Millisecond) // the subscription is set up on its own goroutine
	id := rtID("events")
	container := rtContainer(ctx, client, id, rootfs, oci.WithProcessArgs("sh", "-c", "exit 5"))
	task, exitCh := rtStart(ctx, container, cio.NullIO)
	rtExit("exit", exitCh, 10*time.Second)
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
	ns, _ := namespaces.Namespace(ctx)
	var topics []string
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e := <-ch:
			if e.Namespace != ns {
				fail("envelope namespace", fmt.Errorf("%q", e.Namespace))
			}
			if !strings.HasPrefix(e.Topic, "/tasks/") {
				fail("filter", fmt.Errorf("topic %q passed topic~=\"/tasks/\"", e.Topic))
			}
			v, err := typeurl.UnmarshalAny(e.Event)
			if err != nil {
				fail("UnmarshalAny "+e.Topic, err)
			}
			var cid string
			switch ev := v.(type) {
			case *eventstypes.TaskCreate:
				cid = ev.ContainerID
				if ev.Pid == 0 {
					fail("TaskCreate", fmt.Errorf("%+v", ev))
				}
			case *eventstypes.TaskStart:
				cid = ev.ContainerID
				if ev.Pid != task.Pid() {
					fail("TaskStart", fmt.Errorf("%+v, pid %d", ev, task.Pid()))
				}
			case *eventstypes.TaskExit:
				cid = ev.ContainerID
				if ev.ExitStatus != 5 || ev.ID != id || ev.Pid != task.Pid() || ev.ExitedAt.IsZero() {
					fail("TaskExit", fmt.Errorf("%+v", ev))
				}
			case *eventstypes.TaskDelete:
				cid = ev.ContainerID
				if ev.ExitStatus != 5 || ev.Pid != task.Pid() {
					fail("TaskDelete", fmt.Errorf("%+v", ev))
				}
			default:
				fail("event type", fmt.Errorf("%s: %T", e.Topic, v))
			}
			if cid != id {
				continue
			}
			topics = append(topics, e.Topic)
			if e.Topic == "/tasks/delete" {
				want := "/tasks/create /tasks/start /tasks/exit /tasks/delete"
				if strings.Join(topics, " ") != want {
					fail("order", fmt.Errorf("%v, want %s", topics, want))
				}
				return
			}
		case err := <-errs:
			fail("Subscribe", err)
		case <-timeout:
			fail("events", fmt.Errorf("no /tasks/delete; got %v", topics))
		}
	}
}

// events-publish: a client's own events, as containerd takes them: Publish (the caller's
// namespace, stamped now) and Forward (an envelope with its own namespace and time), each
// received unchanged by a subscriber; topics containerd refuses are InvalidArgument.
func flowEventsPublish(ctx context.Context, client *containerd.Client, address, rootfs string) {
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	ch, errs := client.Subscribe(sctx, `topic~="^/probe/"`)
	time.Sleep(200 * time.Millisecond)
	if err := client.EventService().Publish(ctx, "/probe/custom", &eventstypes.ContainerCreate{ID: "probe"}); err != nil {
		fail("Publish", fmt.Errorf("%w (%s)", err, rtCode(err)))
	}
	for _, topic := range []string{"", "probe", "/", "/a//b", "/a b", "/-a", "/" + strings.Repeat("x", 77)} {
		err := client.EventService().Publish(ctx, topic, &eventstypes.ContainerCreate{ID: "bad"})
		if !errdefs.IsInvalidArgument(err) {
			fail("Publish("+topic+")", fmt.Errorf("want InvalidArgument, got %v", err))
		}
	}
	forwarded, err := typeurl.MarshalAny(&eventstypes.ContainerDelete{ID: "forwarded"})
	if err != nil {
		fail("MarshalAny", err)
	}
	when := time.Unix(1700000000, 123456789).UTC()
	if err := client.EventService().Forward(ctx, &events.Envelope{
		Timestamp: when, Namespace: "probe-fwd", Topic: "/probe/forwarded", Event: forwarded,
	}); err != nil {
		fail("Forward", fmt.Errorf("%w (%s)", err, rtCode(err)))
	}
	if err := client.EventService().Forward(ctx, &events.Envelope{
		Namespace: "probe-fwd", Topic: "/probe/forwarded", Event: forwarded,
	}); !errdefs.IsInvalidArgument(err) {
		fail("Forward(no timestamp)", fmt.Errorf("want InvalidArgument, got %v", err))
	}
	ns, _ := namespaces.Namespace(ctx)
	for i := 0; i < 2; i++ {
		select {
		case e := <-ch:
			v, err := typeurl.UnmarshalAny(e.Event)
			if err != nil {
				fail("UnmarshalAny", err)
			}
			switch c := v.(type) {
			case *eventstypes.ContainerCreate:
				if i != 0 || c.ID != "probe" || e.Topic != "/probe/custom" || e.Namespace != ns {
					fail("published", fmt.Errorf("#%d %s %s %+v", i, e.Namespace, e.Topic, c))
				}
			case *eventstypes.ContainerDelete:
				if i != 1 || c.ID != "forwarded" || e.Namespace != "probe-fwd" || !e.Timestamp.Equal(when) {
					fail("forwarded", fmt.Errorf("#%d %s %s %s %+v", i, e.Namespace, e.Topic, e.Timestamp, c))
				}
			default:
				fail("event", fmt.Errorf("%T %+v", v, v))
			}
		case err := <-errs:
			fail("Subscribe", err)
		case <-time.After(5 * time.Second):
			fail("Subscribe", fmt.Errorf("event #%d never came", i))
		}
	}
}

// kill-signals: a trapped SIGTERM's exit status; Kill(WithKillAll); an exec's Kill.
func flowKillSignals(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("kill"), rootfs,
		oci.WithProcessArgs("sh", "-c", `trap "exit 9" TERM; echo ready; while :; do sleep 0.1; done`))
	var out rtBuffer
	task, ch := rtStart(ctx, container, newCreator(cio.WithStreams(nil, &out, &out)))
	rtWaitFor("trap set", 10*time.Second, func() bool { return strings.Contains(out.String(), "ready") }, out.String)
	if err := task.Kill(ctx, syscall.SIGTERM); err != nil {
		fail("Kill(SIGTERM)", err)
	}
	if s := rtExit("exit after SIGTERM", ch, 10*time.Second); s.ExitCode() != 9 {
		fail("exit after SIGTERM", fmt.Errorf("status %d", s.ExitCode()))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}

	// Kill with WithKillAll: every process of the container
	all := rtContainer(ctx, client, rtID("killall"), rootfs,
		oci.WithProcessArgs("sh", "-c", "sleep 100 & sleep 100 & wait"))
	task2, ch2 := rtStart(ctx, all, cio.NullIO)
	exec, err := task2.Exec(ctx, "k1", rtProcessSpec(ctx, all, "sleep", "100"), cio.NullIO)
	if err != nil {
		fail("Exec", err)
	}
	execCh, err := exec.Wait(ctx)
	if err != nil {
		fail("exec Wait", err)
	}
	if err := exec.Start(ctx); err != nil {
		fail("exec Start", err)
	}
	// an exec's own Kill
	if err := exec.Kill(ctx, syscall.SIGKILL); err != nil {
		fail("exec Kill", err)
	}
	if s := rtExit("exec exit after Kill", execCh, 10*time.Second); s.ExitCode() != 137 {
		fail("exec exit after Kill", fmt.Errorf("status %d", s.ExitCode()))
	}
	if _, err := exec.Delete(ctx); err != nil {
		fail("exec Delete", err)
	}
	time.Sleep(200 * time.Millisecond)
	if err := task2.Kill(ctx, syscall.SIGKILL, containerd.WithKillAll); err != nil {
		fail("Kill(SIGKILL, WithKillAll)", err)
	}
	if s := rtExit("exit after KillAll", ch2, 10*time.Second); s.ExitCode() != 137 {
		fail("exit after KillAll", fmt.Errorf("status %d", s.ExitCode()))
	}
	if pids, err := task2.Pids(ctx); err == nil && len(pids) != 0 {
		fail("Pids after KillAll", fmt.Errorf("%+v", pids))
	}
	if err := task2.Kill(ctx, syscall.SIGKILL); err == nil {
		fmt.Println("note: kill of an exited task succeeded")
	} else {
		fmt.Printf("kill of an exited task: %v (%s)\n", err, rtCode(err))
	}
	if _, err := task2.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}

// rtStartDirect: a task started with FIFOs in a temp dir, its client's ends opened
// directly (cio.DirectIO), as a client that will go away and leave the task running.
func rtStartDirect(ctx context.Context, container containerd.Container, id string) (containerd.Task, *cio.DirectIO) {
	dir, err := os.MkdirTemp("", "goclient-fifo-")
	if err != nil {
		fail("MkdirTemp", err)
	}
	cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	fifos, err := cio.NewFIFOSetInDir(dir, id, false)
	if err != nil {
		fail("NewFIFOSetInDir", err)
	}
	var first *cio.DirectIO
	task, err := container.NewTask(ctx, func(string) (cio.IO, error) {
		d, err := cio.NewDirectIO(ctx, fifos)
		first = d
		return d, err
	})
	if err != nil {
		fail("NewTask", err)
	}
	if err := task.Start(ctx); err != nil {
		fail("Start", err)
	}
	return task, first
}

// reattach: a task whose first client went away (ctr run -d), attached to again through
// its FIFOs as `ctr tasks attach` does: input and output after the attach.
func flowReattach(ctx context.Context, client *containerd.Client, address, rootfs string) {
	id := rtID("attach")
	container := rtContainer(ctx, client, id, rootfs,
		oci.WithProcessArgs("sh", "-c", `echo started; while read l; do echo "got $l"; done; echo eof`))
	task, first := rtStartDirect(ctx, container, id)
	line := make([]byte, 64)
	n, err := first.Stdout.Read(line)
	if err != nil || string(line[:n]) != "started\n" {
		fail("first output", fmt.Errorf("%q %v", line[:n], err))
	}
	if _, err := first.Stdin.Write([]byte("one\n")); err != nil {
		fail("first input", err)
	}
	n, err = first.Stdout.Read(line)
	if err != nil || string(line[:n]) != "got one\n" {
		fail("first echo", fmt.Errorf("%q %v", line[:n], err))
	}
	// the first client goes away (its ends of the FIFOs close; the FIFOs stay)
	first.Stdin.Close()
	first.Stdout.Close()
	first.Stderr.Close()
	time.Sleep(200 * time.Millisecond)

	loaded, err := client.LoadContainer(ctx, id)
	if err != nil {
		fail("LoadContainer", err)
	}
	r, w := io.Pipe()
	defer w.Close()
	var out rtBuffer
	attached, err := loaded.Task(ctx, cio.NewAttach(cio.WithStreams(r, &out, &out)))
	if err != nil {
		fail("Task(NewAttach)", err)
	}
	if attached.Pid() != task.Pid() {
		fail("attached Pid", fmt.Errorf("%d, want %d", attached.Pid(), task.Pid()))
	}
	if st, err := attached.Status(ctx); err != nil || st.Status != containerd.Running {
		fail("attached Status", fmt.Errorf("%+v %v (the task ended when its first client went away?)", st, err))
	}
	if _, err := w.Write([]byte("two\n")); err != nil {
		fail("attached input", err)
	}
	rtWaitFor("output after attach", 10*time.Second, func() bool { return strings.Contains(out.String(), "got two\n") }, out.String)
	if _, err := attached.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("Delete", err)
	}
}

// reattach-output: output only: a task printing on, its first client gone (its ends of the
// FIFOs closed), still running and heard again through cio.NewAttach.
func flowReattachOutput(ctx context.Context, client *containerd.Client, address, rootfs string) {
	id := rtID("attachout")
	container := rtContainer(ctx, client, id, rootfs,
		oci.WithProcessArgs("sh", "-c", `i=0; while :; do echo "tick $i"; i=$((i+1)); sleep 0.05; done`))
	_, first := rtStartDirect(ctx, container, id)
	line := make([]byte, 64)
	if n, err := first.Stdout.Read(line); err != nil || !strings.HasPrefix(string(line[:n]), "tick 0") {
		fail("first output", fmt.Errorf("%q %v", line[:n], err))
	}
	first.Stdin.Close()
	first.Stdout.Close()
	first.Stderr.Close()
	time.Sleep(500 * time.Millisecond) // ten lines nobody reads
	got, err := client.TaskService().Get(ctx, &tasksapi.GetRequest{ContainerID: id})
	if err != nil {
		fail("Tasks.Get", err)
	}
	if p, fifos := got.Process, first.Config(); p.Stdin != fifos.Stdin || p.Stdout != fifos.Stdout || p.Stderr != fifos.Stderr {
		fail("Tasks.Get", fmt.Errorf("FIFOs stdin %q stdout %q stderr %q, created with %q %q %q",
			p.Stdin, p.Stdout, p.Stderr, fifos.Stdin, fifos.Stdout, fifos.Stderr))
	}
	loaded, err := client.LoadContainer(ctx, id)
	if err != nil {
		fail("LoadContainer", err)
	}
	// a stdin always, as ctr's (cio's copy of a FIFO Tasks/Get names needs a reader)
	idle, idleW := io.Pipe()
	defer idleW.Close()
	var out rtBuffer
	attached, err := loaded.Task(ctx, cio.NewAttach(cio.WithStreams(idle, &out, &out)))
	if err != nil {
		fail("Task(NewAttach)", err)
	}
	if st, err := attached.Status(ctx); err != nil || st.Status != containerd.Running {
		fail("attached Status", fmt.Errorf("%+v %v", st, err))
	}
	rtWaitFor("output after attach", 10*time.Second, func() bool { return strings.Count(out.String(), "tick") >= 5 }, out.String)
	if _, err := attached.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("Delete", err)
	}
	attached.IO().Close()
}

// checkpoint: Tasks/Checkpoint's answer; the task is left running (the client pauses it
// first and resumes it after).
func flowCheckpoint(ctx context.Context, client *containerd.Client, address, rootfs string) {
	container := rtContainer(ctx, client, rtID("ckpt"), rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	start := time.Now()
	image, err := task.Checkpoint(ctx)
	took := time.Since(start)
	if err == nil {
		fmt.Printf("checkpoint made: %s\n", image.Name())
		client.ImageService().Delete(ctx, image.Name())
	} else {
		fmt.Printf("Checkpoint error: %v (%s) after %s\n", err, rtCode(err), took.Round(time.Millisecond))
	}
	st, serr := task.Status(ctx)
	if serr != nil || st.Status != containerd.Running {
		fail("Status after Checkpoint", fmt.Errorf("%+v %v", st, serr))
	}
	if err != nil && !errdefs.IsNotImplemented(err) {
		fail("Checkpoint", fmt.Errorf("want NotImplemented (Unimplemented), got %v", err))
	}
	// a leftover paused task would block Delete
	if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil {
		fail("Delete", err)
	}
	// containerd's client leaves a lease behind only on success
	leases, err := client.LeasesService().List(ctx)
	if err != nil {
		fail("Leases.List", err)
	}
	if len(leases) != 0 {
		fmt.Printf("note: %d leases left after Checkpoint\n", len(leases))
	}
}

// spec-opts: the host's network namespace, a user, env, a bind mount, capabilities.
func flowSpecOpts(ctx context.Context, client *containerd.Client, address, rootfs string) {
	dir, err := os.MkdirTemp("", "goclient-mount-")
	if err != nil {
		fail("MkdirTemp", err)
	}
	cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	if err := os.WriteFile(filepath.Join(dir, "file"), []byte("from the host\n"), 0o644); err != nil {
		fail("WriteFile", err)
	}
	hostNet, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		fail("Readlink", err)
	}
	container := rtContainer(ctx, client, rtID("specopts"), rootfs,
		oci.WithHostNamespace(specs.NetworkNamespace),
		oci.WithUser("1000:1000"),
		oci.WithEnv([]string{"PROBE=value with spaces"}),
		oci.WithMounts([]specs.Mount{{Destination: "/mnt/probe", Type: "bind", Source: dir, Options: []string{"rbind", "ro"}}}),
		oci.WithCapabilities([]string{"CAP_NET_RAW", "CAP_CHOWN"}),
		oci.WithProcessCwd("/mnt/probe"),
		oci.WithHostname("probe-host"),
		oci.WithProcessArgs("sh", "-c", "id; env; grep Cap /proc/self/status; readlink /proc/self/ns/net; pwd; cat file; hostname; touch x 2>/dev/null && echo writable || echo readonly"))
	var out rtBuffer
	task, ch := rtStart(ctx, container, newCreator(cio.WithStreams(nil, &out, &out)))
	if s := rtExit("exit", ch, 10*time.Second); s.ExitCode() != 0 {
		fail("exit", fmt.Errorf("status %d: %q", s.ExitCode(), out.String()))
	}
	task.IO().Wait()
	got := out.String()
	var missing []string
	for _, want := range []string{
		"uid=1000 gid=1000",
		"PROBE=value with spaces\n",
		"PATH=/usr/local/sbin:",
		"CapBnd:\t0000000000002001\n",
		hostNet + "\n",
		"/mnt/probe\n",
		"from the host\n",
		"probe-host\n",
		"readonly\n",
	} {
		if !strings.Contains(got, want) {
			missing = append(missing, want)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		fail("output", fmt.Errorf("lacks %q in %q", missing, got))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}

// log-file: cio.LogFile (file:// stdio, ctr run --log-uri file://): both streams land in
// the file.
func flowLogFile(ctx context.Context, client *containerd.Client, address, rootfs string) {
	dir, err := os.MkdirTemp("", "goclient-log-")
	if err != nil {
		fail("MkdirTemp", err)
	}
	cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "sub", "out.log")
	container := rtContainer(ctx, client, rtID("logfile"), rootfs,
		oci.WithProcessArgs("sh", "-c", "echo out; echo err >&2"))
	task, ch := rtStart(ctx, container, cio.LogFile(path))
	if s := rtExit("exit", ch, 10*time.Second); s.ExitCode() != 0 {
		fail("exit", fmt.Errorf("status %d", s.ExitCode()))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		fail("log file", err)
	}
	if !strings.Contains(string(data), "out\n") || !strings.Contains(string(data), "err\n") {
		fail("log file", fmt.Errorf("%q", data))
	}
}

// log-binary: cio.BinaryIO (binary:// stdio, nerdctl's logging): a logger started by the
// runtime with stdout on fd 3, stderr on fd 4, readiness on fd 5, and CONTAINER_ID.
func flowLogBinary(ctx context.Context, client *containerd.Client, address, rootfs string) {
	dir, err := os.MkdirTemp("", "goclient-logger-")
	if err != nil {
		fail("MkdirTemp", err)
	}
	cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	logPath := filepath.Join(dir, "out.log")
	logger := filepath.Join(dir, "logger")
	script := fmt.Sprintf("#!/bin/sh\necho \"id=$CONTAINER_ID ns=$CONTAINER_NAMESPACE args=$*\" >> %[1]s\n"+
		"cat <&3 >> %[1]s 5>&- &\ncat <&4 >> %[1]s 5>&- &\nexec 5>&-\nwait\n", logPath)
	if err := os.WriteFile(logger, []byte(script), 0o755); err != nil {
		fail("WriteFile", err)
	}
	id := rtID("logbin")
	container := rtContainer(ctx, client, id, rootfs,
		oci.WithProcessArgs("sh", "-c", "echo out; echo err >&2"))
	task, ch := rtStart(ctx, container, cio.BinaryIO(logger, map[string]string{"key": "value"}))
	if s := rtExit("exit", ch, 10*time.Second); s.ExitCode() != 0 {
		fail("exit", fmt.Errorf("status %d", s.ExitCode()))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
	ns, _ := namespaces.Namespace(ctx)
	var data []byte
	rtWaitFor("logger output", 5*time.Second, func() bool {
		data, _ = os.ReadFile(logPath)
		s := string(data)
		return strings.Contains(s, "out\n") && strings.Contains(s, "err\n")
	}, func() string { return fmt.Sprintf("%q", data) })
	if !strings.Contains(string(data), "id="+id+" ns="+ns+" args=key value\n") {
		fail("logger environment", fmt.Errorf("%q", data))
	}
}

// rootfs-mounts: the rootfs as mounts in CreateTaskRequest (BuildKit's and nerdctl's way,
// from a snapshotter), the spec's root the bundle's "rootfs".
func flowRootfsMounts(ctx context.Context, client *containerd.Client, address, rootfs string) {
	id := rtID("rootfsmounts")
	container, err := client.NewContainer(ctx, id, containerd.WithNewSpec(oci.WithDefaultPathEnv,
		oci.WithProcessArgs("sh", "-c", "test -x /bin/busybox && echo here")))
	if err != nil {
		fail("NewContainer", err)
	}
	cleanups = append(cleanups, func() {
		cctx, cancel := rtCleanCtx(ctx)
		defer cancel()
		if task, err := container.Task(cctx, nil); err == nil {
			task.Delete(cctx, containerd.WithProcessKill)
		}
		container.Delete(cctx)
	})
	var out rtBuffer
	task, ch := rtStart(ctx, container, newCreator(cio.WithStreams(nil, &out, &out)),
		containerd.WithRootFS([]mount.Mount{{Type: "bind", Source: rootfs, Options: []string{"rbind", "rw"}}}))
	if s := rtExit("exit", ch, 10*time.Second); s.ExitCode() != 0 {
		fail("exit", fmt.Errorf("status %d: %q", s.ExitCode(), out.String()))
	}
	task.IO().Wait()
	if out.String() != "here\n" {
		fail("output", fmt.Errorf("%q", out.String()))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}

// task-list: Tasks/List and Tasks/Get as `ctr tasks ls` and dockerd's restore read them.
func flowTaskList(ctx context.Context, client *containerd.Client, address, rootfs string) {
	id := rtID("list")
	container := rtContainer(ctx, client, id, rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	listed, err := client.TaskService().List(ctx, &tasksapi.ListTasksRequest{})
	if err != nil {
		fail("Tasks.List", err)
	}
	found := false
	for _, p := range listed.Tasks {
		if p.ID == id {
			found = true
			if p.Pid != task.Pid() || p.Status.String() != "RUNNING" || (p.ContainerID != "" && p.ContainerID != id) {
				fail("Tasks.List", fmt.Errorf("%+v", p))
			}
		}
	}
	if !found {
		fail("Tasks.List", fmt.Errorf("%s not listed in %+v", id, listed.Tasks))
	}
}

// rtEvent: one event of a subscription, unmarshalled, with the container and process it is
// about ("" for the init's own).
type rtEvent struct {
	topic, container, process string
	exit                      uint32
	pid                       uint32
}

func (e rtEvent) String() string { return e.topic + ":" + e.process }

// rtCollect: the events of `container` until `until` (an event's String) or timeout.
func rtCollect(ch <-chan *events.Envelope, errs <-chan error, container, until string) []rtEvent {
	var got []rtEvent
	timeout := time.After(10 * time.Second)
	for {
		select {
		case e := <-ch:
			v, err := typeurl.UnmarshalAny(e.Event)
			if err != nil {
				fail("UnmarshalAny "+e.Topic, err)
			}
			ev := rtEvent{topic: e.Topic}
			switch x := v.(type) {
			case *eventstypes.TaskCreate:
				ev.container, ev.pid = x.ContainerID, x.Pid
			case *eventstypes.TaskStart:
				ev.container, ev.pid = x.ContainerID, x.Pid
			case *eventstypes.TaskExit:
				ev.container, ev.pid, ev.exit = x.ContainerID, x.Pid, x.ExitStatus
				if x.ID != x.ContainerID {
					ev.process = x.ID
				}
			case *eventstypes.TaskDelete:
				ev.container, ev.pid, ev.exit = x.ContainerID, x.Pid, x.ExitStatus
				if x.ID != "" && x.ID != x.ContainerID {
					ev.process = x.ID
				}
			case *eventstypes.TaskExecAdded:
				ev.container, ev.process = x.ContainerID, x.ExecID
			case *eventstypes.TaskExecStarted:
				ev.container, ev.process, ev.pid = x.ContainerID, x.ExecID, x.Pid
			case *eventstypes.TaskPaused:
				ev.container = x.ContainerID
			case *eventstypes.TaskResumed:
				ev.container = x.ContainerID
			case *eventstypes.TaskOOM:
				ev.container = x.ContainerID
			default:
				fail("event type", fmt.Errorf("%s: %T", e.Topic, v))
			}
			if ev.container != container {
				continue
			}
			got = append(got, ev)
			if ev.String() == until {
				return got
			}
		case err := <-errs:
			fail("Subscribe", err)
		case <-timeout:
			fail("events", fmt.Errorf("no %s; got %v", until, got))
		}
	}
}

// events-exec: an exec's events (dockerd learns of an exec's exit from /tasks/exit with
// the exec's ID), and pause/resume's.
func flowEventsExec(ctx context.Context, client *containerd.Client, address, rootfs string) {
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	ch, errs := client.Subscribe(sctx, `topic~="/tasks/"`)
	time.Sleep(200 * time.Millisecond)
	id := rtID("eventsexec")
	container := rtContainer(ctx, client, id, rootfs, oci.WithProcessArgs("sleep", "100"))
	task, _ := rtStart(ctx, container, cio.NullIO)
	process, err := task.Exec(ctx, "x1", rtProcessSpec(ctx, container, "sh", "-c", "exit 2"), cio.NullIO)
	if err != nil {
		fail("Exec", err)
	}
	pch, err := process.Wait(ctx)
	if err != nil {
		fail("exec Wait", err)
	}
	if err := process.Start(ctx); err != nil {
		fail("exec Start", err)
	}
	rtExit("exec exit", pch, 10*time.Second)
	if _, err := process.Delete(ctx); err != nil {
		fail("exec Delete", err)
	}
	if err := task.Pause(ctx); err != nil {
		fail("Pause", err)
	}
	if err := task.Resume(ctx); err != nil {
		fail("Resume", err)
	}
	got := rtCollect(ch, errs, id, "/tasks/resumed:")
	var names []string
	for _, e := range got {
		names = append(names, e.String())
		switch {
		case e.topic == "/tasks/exit" && e.process == "x1":
			if e.exit != 2 || e.pid != process.Pid() {
				fail("exec's TaskExit", fmt.Errorf("status %d pid %d, want 2 and %d", e.exit, e.pid, process.Pid()))
			}
		case e.topic == "/tasks/exec-started":
			if e.pid != process.Pid() {
				fail("TaskExecStarted", fmt.Errorf("pid %d, want %d", e.pid, process.Pid()))
			}
		}
	}
	fmt.Printf("events: %s\n", strings.Join(names, " "))
	want := "/tasks/create: /tasks/start: /tasks/exec-added:x1 /tasks/exec-started:x1 /tasks/exit:x1"
	if !strings.HasPrefix(strings.Join(names, " "), want) {
		fail("order", fmt.Errorf("%v, want %s ... /tasks/paused: /tasks/resumed:", names, want))
	}
	if strings.Join(names[len(names)-2:], " ") != "/tasks/paused: /tasks/resumed:" {
		fail("order", fmt.Errorf("%v: no /tasks/paused then /tasks/resumed at the end", names))
	}
}

// events-oom: a container over its memory limit: /tasks/oom, then its exit (137), as
// dockerd marks OOMKilled.
func flowEventsOOM(ctx context.Context, client *containerd.Client, address, rootfs string) {
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	ch, errs := client.Subscribe(sctx, `topic~="/tasks/"`)
	time.Sleep(200 * time.Millisecond)
	id := rtID("oom")
	container := rtContainer(ctx, client, id, rootfs, oci.WithMemoryLimit(16*1024*1024),
		oci.WithProcessArgs("sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived"))
	task, exitCh := rtStart(ctx, container, cio.NullIO)
	s := rtExit("exit", exitCh, 20*time.Second)
	got := rtCollect(ch, errs, id, "/tasks/exit:")
	var names []string
	for _, e := range got {
		names = append(names, e.String())
	}
	fmt.Printf("exit %d; events: %s\n", s.ExitCode(), strings.Join(names, " "))
	if !strings.Contains(strings.Join(names, " "), "/tasks/oom:") {
		fail("no /tasks/oom", fmt.Errorf("%v", names))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}

// runtime-options: runc options on the container (WithRuntime, as nerdctl and BuildKit)
// and on the task (WithNoNewKeyring).
func flowRuntimeOptions(ctx context.Context, client *containerd.Client, address, rootfs string) {
	id := rtID("runtimeopts")
	container, err := client.NewContainer(ctx, id,
		containerd.WithRuntime("io.containerd.runc.v2", &options.Options{NoNewKeyring: true}),
		containerd.WithNewSpec(oci.WithRootFSPath(rootfs), oci.WithDefaultPathEnv, oci.WithProcessArgs("sh", "-c", "exit 6")))
	if err != nil {
		fail("NewContainer", err)
	}
	cleanups = append(cleanups, func() {
		cctx, cancel := rtCleanCtx(ctx)
		defer cancel()
		if task, err := container.Task(cctx, nil); err == nil {
			task.Delete(cctx, containerd.WithProcessKill)
		}
		container.Delete(cctx)
	})
	info, err := container.Info(ctx)
	if err != nil {
		fail("Info", err)
	}
	if info.Runtime.Options == nil {
		fail("Info", fmt.Errorf("runtime options lost: %+v", info.Runtime))
	}
	v, err := typeurl.UnmarshalAny(info.Runtime.Options)
	if err != nil {
		fail("runtime options", err)
	}
	if o, ok := v.(*options.Options); !ok || !o.NoNewKeyring {
		fail("runtime options", fmt.Errorf("%T %+v", v, v))
	}
	task, ch := rtStart(ctx, container, cio.NullIO, containerd.WithNoNewKeyring)
	if s := rtExit("exit", ch, 10*time.Second); s.ExitCode() != 6 {
		fail("exit", fmt.Errorf("status %d", s.ExitCode()))
	}
	if _, err := task.Delete(ctx); err != nil {
		fail("Delete", err)
	}
}
